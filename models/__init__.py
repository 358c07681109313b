"""Reference models for onnxslim: trained MNIST classifiers and benchmark architectures (see README.md)."""
