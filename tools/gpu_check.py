"""GPU check of the training path: `harden finetune` on CUDA with and without AMP, and what users do next with
the checkpoint (load it on a CPU, resume it on the CPU, export it to ONNX).

The test suite runs on CPUs only, so this script is the one place where the CUDA branches of
harden.train (device placement, float16 autocast, GradScaler and its checkpointed state) run. It needs a CUDA
device and only the packages the training path imports (torch, numpy, scikit-learn's digits, onnx, onnxruntime,
onnxscript, and onnx-graphsurgeon for the export's constant folding), so it runs on a bare GPU machine from the
repository root (with onnx-graphsurgeon's pure-Python wheel on PYTHONPATH if the machine lacks it):

    PYTHONPATH=. python3 tools/gpu_check.py [--out DIR] [--epochs 10]

It prints one line per check and a table of accuracies and epoch times (CUDA and CPU on the same machine), writes
them to DIR/gpu_check.json, and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_embeddings(path: Path, dim: int = 32) -> Path:
    """Unit rows in the embeddings.npz layout of `harden embed`, one per digit (a stand-in for a text encoder)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(path, classes=np.asarray([str(d) for d in range(10)]), embeddings=emb, encoder=np.asarray("gpu-check"),
             source_sha256=np.asarray(""))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on the CPU, to check this script where there is no GPU")
    args = parser.parse_args()
    gpu = "cpu" if args.dry_run else "cuda"

    import torch

    from harden.train.checkpoint import load_checkpoint
    from harden.train.config import FinetuneConfig
    from harden.train.export import export_onnx
    from harden.train.finetune import finetune

    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    device_name = "dry run on the CPU" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, {device_name}")
    failures: list[str] = []
    rows: list[dict[str, Any]] = []

    def check(ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    work = Path(tempfile.mkdtemp(prefix="harden-gpu-"))
    emb = write_embeddings(work / "emb.npz")

    def run(name: str, **kw: Any) -> Any:
        values: dict[str, Any] = dict(arch="tinyresnet", data="digits:train", output=str(work / f"{name}.pt"),
                                      head="text", embeddings=str(emb), epochs=args.epochs, batch_size=64,
                                      progress=False, lr=0.05, seed=0)
        values.update(kw)
        config = FinetuneConfig(**values)
        started = time.perf_counter()
        result = finetune(config)
        last = result.metrics[-1]
        rows.append({"run": name, "arch": config.arch, "device": config.device, "amp": config.amp,
                     "eval_acc": last.eval_acc, "logit_scale": last.logit_scale,
                     "epoch_s": float(np.median([m.seconds for m in result.metrics])),
                     "wall_s": time.perf_counter() - started})
        return result

    for run_name, device, amp in (("cuda-amp", gpu, True), ("cuda-fp32", gpu, False), ("cpu", "cpu", False)):
        result = run(run_name, device=device, amp=amp)
        acc = result.metrics[-1].eval_acc
        finite = all(np.isfinite(m.train_loss) for m in result.metrics)
        check(finite and acc is not None and acc >= 0.8,
              f"{run_name}: tinyresnet + text head learns digits (eval acc {acc:.3f}, losses finite: {finite})")
        ckpt = load_checkpoint(result.checkpoint)
        on_cpu = all(t.device.type == "cpu" for t in ckpt.state_dict.values())
        check(on_cpu, f"{run_name}: checkpoint loads on the CPU")
        if device == "cuda":
            check((ckpt.scaler is not None) == amp, f"{run_name}: GradScaler state saved exactly when AMP is on")

    # a CUDA run resumed on the CPU: the optimizer state moves across devices
    base = run("cuda-2", device=gpu, epochs=2)
    resumed = run("cpu-resumed", device="cpu", epochs=3, resume=base.checkpoint, output=str(work / "cpu-resumed.pt"))
    check([m.epoch for m in resumed.metrics] == [1, 2, 3], "a 2-epoch CUDA checkpoint resumes on the CPU to 3")

    # the AMP-trained checkpoint exports, and ONNX Runtime agrees with torch (export checks parity itself)
    exported = export_onnx(work / "cuda-amp.pt", work / "cuda-amp.onnx")
    check(exported.top1_agreement == 1.0,
          f"export of the AMP checkpoint: ORT vs torch max |diff| {exported.max_abs_diff:.2e}, "
          f"top-1 agreement {exported.top1_agreement:.3f}")

    # a torchvision backbone at 32 px, from scratch: CUDA vs CPU on the same machine. AdamW, since SGD stalls
    # with the text head on untrained features (harden.train.finetune.stall_warning)
    for label, device in (("cuda", gpu), ("cpu", "cpu")):
        result = run(f"resnet18-{label}", arch="resnet18", size=32, device=device, epochs=5, batch_size=128,
                     optimizer="adamw", lr=1e-3)
        acc = result.metrics[-1].eval_acc
        check(acc is not None and acc >= 0.8, f"resnet18-{label}: ResNet-18 + text head learns digits at 32 px "
                                              f"(eval acc {acc:.3f})")
    print(f"\n{'run':14s} {'arch':11s} {'device':6s} {'amp':5s} {'eval acc':>8s} {'s/epoch':>8s}")
    for r in rows:
        print(f"{r['run']:14s} {r['arch']:11s} {r['device']:6s} {str(r['amp']):5s} {r['eval_acc']:8.3f} "
              f"{r['epoch_s']:8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": device_name, "dry_run": args.dry_run,
                                                    "torch": torch.__version__, "runs": rows,
                                                    "failures": failures}, indent=2))
    print(f"\n{len(failures)} check(s) failed" if failures else "\nall checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
