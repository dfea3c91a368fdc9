"""Fault injection at the ONNX Runtime level: bit flips, sites, campaigns and statistics."""
