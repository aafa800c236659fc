"""Export stage: ONNX/TFLite graph, per-layer singular bases and a manifest, once per device."""
