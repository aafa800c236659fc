"""On-device runtime: verify packets, regenerate bases, patch weights, switch adapters.

Never imports torch: a board installs only numpy, onnxruntime (or LiteRT) and click.
"""
