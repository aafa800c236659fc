"""The table bench/runtime.py prints from its results (one dict, as written to ``--out``)."""

from __future__ import annotations


def cell(s: dict) -> str:
    return f"{s['median_ms']:7.1f} ({s['min_ms']:6.1f})"


def print_table(r: dict) -> None:
    peft, baked, mechs = r["peft"], r["baked"], r["mechanisms"]
    merge = peft["load_adapter_merge"]["median_ms"]
    recreate = mechs.get("recreate")
    size_mb = r["sizes"]["adaptable_weights_bytes"] / 2**20
    pk = r["packets"]
    print(f"packets: small {pk['small']['bytes']} B ({pk['small']['kept']} values), large "
          f"{pk['large']['bytes']} B ({pk['large']['kept']} values); adaptable weights "
          f"{size_mb:.1f} MiB; threads {r['threads']}; median (min) of {r['repeat']}")
    head = (f"{'mechanism':12s} {'apply 4K ms':>15s} {'apply 73K ms':>15s} {'/PEFT 4K':>8s} "
            f"{'/PEFT 73K':>9s} {'/recr 73K':>9s} {'switch ms':>15s} {'infer ms':>15s} "
            f"{'/baked':>6s} {'dRSS MiB':>8s}")
    print(head)
    print("-" * len(head))
    for mech, row in mechs.items():
        small, large = row["small"]["apply"], row["large"]["apply"]
        d_rss = (row["rss"]["rss_peak"] - row["rss"]["rss_before"]) / 2**20
        rec = large["median_ms"] / recreate["large"]["apply"]["median_ms"] if recreate else 0
        print(f"{mech:12s} {cell(small):>15s} {cell(large):>15s} "
              f"{small['median_ms'] / merge:8.3f} {large['median_ms'] / merge:9.3f} {rec:9.3f} "
              f"{cell(row['switch']):>15s} {cell(row['infer']):>15s} "
              f"{row['infer']['median_ms'] / baked['infer']['median_ms']:6.2f} {d_rss:8.1f}")
    print(f"{'PEFT torch':12s} {cell(peft['load_adapter_merge']):>15s} (load_adapter + "
          f"merge_and_unload, same adapter); switch {cell(peft['switch'])}; infer "
          f"{cell(peft['infer'])}")
    print(f"{'ORT session':12s} create {baked['create_ms']:.1f} ms (plain session, prepacking on);"
          f" infer {cell(baked['infer'])}")
    vouches = [s for s in ("large", "large-outputs", "large-none") if s in pk]
    if len(vouches) > 1:
        print("apply of the large packet by what it vouches for (update digest, the default /"
              " output canary / none), median (min) ms and /PEFT:")
        for mech, row in mechs.items():
            print(f"  {mech:12s} " + "   ".join(
                f"{cell(row[s]['apply'])} {row[s]['apply']['median_ms'] / merge:6.3f}"
                for s in vouches))
    own = [s for s in pk if s.startswith("own:")]
    for size in own:
        own_peft = peft.get("own", {}).get(size)
        against = own_peft["median_ms"] if own_peft else merge
        print(f"apply of {size[4:]} ({pk[size]['bytes']} B, {pk[size]['kept']} values, made by "
              "compress), median (min) ms and /PEFT, against PEFT's load + merge of "
              + (f"the adapter it was made from, {cell(own_peft).strip()} ms:" if own_peft
                 else "the bench's adapter:"))
        for mech, row in mechs.items():
            print(f"  {mech:12s} {cell(row[size]['apply'])} "
                  f"{row[size]['apply']['median_ms'] / against:6.3f}")
    print("apply steps, median ms (verify / decode / stage / probe / commit):")
    for mech, row in mechs.items():
        for size in ("small", *vouches, *own):
            st = row[size]["steps_median_ms"]
            print(f"  {mech:12s} {size[:24]:24s} " + " / ".join(
                f"{st[k]:.2f}" for k in ("verify_ms", "decode_ms", "stage_ms", "probe_ms",
                                         "commit_ms")))
    print("apply against kept coefficients (mechanism "
          f"{r['sweep'][0]['mechanism'] if r['sweep'] else '-'}):")
    print(f"  {'representation':14s} {'setting':>12s} {'bytes':>7s} {'kept':>7s} "
          f"{'apply ms':>15s} {'decode ms':>15s} {'decode ns/value':>15s}")
    for p in r["sweep"]:
        setting = f"k={p['max_rank']}" if "max_rank" in p else f"{p['budget_bytes']} B"
        per_value = 1e6 * p["decode"]["median_ms"] / max(p["kept"], 1)
        print(f"  {p['representation']:14s} {setting:>12s} {p['packet_bytes']:7d} "
              f"{p['kept']:7d} {cell(p['apply']):>15s} {cell(p['decode']):>15s} "
              f"{per_value:15.1f}")
