"""The ONNX front end: loads a model, reads it as a GraphView, splices fused sites as standard or
com.microsoft ops and verifies the result in onnxruntime (``convert`` is the entry point)."""
