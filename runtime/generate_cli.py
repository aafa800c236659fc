"""``solar-edge generate``: continue prompts with a decoder bundle, patched by signed packets.

Tokens are printed as they arrive. Every packet is staged once; each ``--switch ID`` in turn
then serves (the same session: a switch swaps the LoRA feeds, nothing is rebuilt) and answers
every prompt, so one call shows the same prompt answered by several adapters.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from solar_edge.cli import options
from solar_edge.format import signing
from solar_edge.runtime.backends import mechanisms


@click.command("generate")
@options.packets(required=False)
@click.option("--bundle", "bundle_dir", required=True,
              type=click.Path(exists=True, file_okay=False), help="Exported decoder bundle.")
@click.option("--packet", "flag_packets", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Signed packet to stage (repeatable; same as the PACKET arguments).")
@options.trusted_keys()
@click.option("--prompt", "prompts", multiple=True, required=True,
              help="Prompt text (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0: greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the K most likely tokens (0: all).")
@click.option("--seed", type=int, default=None, help="Sampling seed.")
@click.option("--switch", "switch_to", multiple=True,
              help="Adapter id to serve (repeatable: each answers every prompt in turn; "
                   "default: the last packet's, or the base model without packets).")
@click.option("--mechanism", type=click.Choice(mechanisms()), default=None,
              help="Patching mechanism (default: the bundle profile's).")
@options.as_json()
def generate(packets: tuple[Path, ...], bundle_dir: str, flag_packets: tuple[Path, ...],
             trusted_keys: tuple[Path, ...], prompts: tuple[str, ...], max_new_tokens: int,
             temperature: float, top_k: int, seed: int | None, switch_to: tuple[str, ...],
             mechanism: str | None, as_json: bool) -> None:
    """Continue each --prompt with the bundle's decoder, streaming tokens as they come."""
    from solar_edge.runtime.cli import _no_keys
    from solar_edge.runtime.engine import EdgeRuntime

    packets = packets + flag_packets
    if packets and not trusted_keys:
        raise click.UsageError("packets need at least one --trusted-key")
    trusted = [signing.load_public_key(k) for k in trusted_keys]
    rt = EdgeRuntime(bundle_dir, trusted or _no_keys(), mechanism=mechanism)
    staged = [rt.stage(path.read_bytes()).adapter_id for path in packets]
    serve: list[str | None] = list(switch_to) or [staged[-1] if staged else None]
    runs: list[dict[str, Any]] = []
    for adapter in serve:
        t = time.perf_counter()
        rt.activate(adapter)
        switch_ms = (time.perf_counter() - t) * 1e3
        for prompt in prompts:
            started: list[bool] = []  # the prompt is echoed with its first token: a refused
            #                           request leaves only its error line

            def stream(_token: int, piece: str, prompt: str = prompt,
                       adapter: str | None = adapter, started: list = started) -> None:
                if as_json:
                    return
                if not started:
                    click.echo(f"[{adapter or 'base model'}] {prompt}", nl=False)
                    started.append(True)
                click.echo(piece, nl=False)

            out = rt.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                              seed=seed, on_token=stream)
            if not as_json:
                click.echo("")
            runs.append({"adapter_id": adapter, "prompt": prompt, "text": out.text,
                         "ids": out.ids, "switch_ms": round(switch_ms, 3),
                         "first_token_ms": round(out.first_token_ms, 2),
                         "tokens_per_s": round(out.tokens_per_s, 1)})
            switch_ms = 0.0
    if as_json:
        options.emit_json({"mechanism": rt.mechanism, "staged": staged, "runs": runs})
        return
    for r in runs:
        click.echo(f"# {r['adapter_id'] or 'base model'}: {len(r['ids'])} tokens, first "
                   f"{r['first_token_ms']:.1f} ms, {r['tokens_per_s']:.0f} tokens/s", err=True)
