"""Fine-tuning backbones with a text-guided (or baseline) head, and export to ONNX.

Public entry points (torch is imported lazily inside them):

- `harden.train.backbones.build_model(arch, num_classes, head, embeddings, in_channels, ...)`
- `harden.train.finetune.finetune(FinetuneConfig) -> FinetuneResult`
- `harden.train.export.export_onnx(ckpt_path, out_path, ...) -> ExportResult`
"""
