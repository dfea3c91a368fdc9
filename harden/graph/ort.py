"""ONNX Runtime sessions, and exposing intermediate tensors as outputs.

Fault injection and range profiling both need values of tensors inside the
graph. ORT only returns graph outputs, so the tensors are added as outputs of a
copy of the model; with graph optimisations at their default, ORT could fuse
such tensors away, which is why the optimisation level is explicit here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from harden.errors import HardenError

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(
    model: onnx.ModelProto,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    opt_level: str = "basic",
    threads: int = 0,
    spinning: bool = True,
    shared_arena: bool = False,
    save_optimized: str | None = None,
    shared: Mapping[str, ort.OrtValue] | None = None,
) -> ort.InferenceSession:
    """An inference session for an in-memory model, on the given providers.

    `threads` sets the intra-op thread count (0: ORT's default, one per physical
    core). `spinning=False` makes idle intra-op threads sleep instead of
    busy-waiting and runs nodes sequentially on one inter-op thread: on a CPU
    shared with other jobs, spinning threads fight over cores and a small
    model's run can get several times slower. Neither setting changes results.

    `shared_arena=True` takes CPU memory from one arena shared by every session
    that asks for it, instead of an arena per session. The injector's engine
    runs each node in a session of its own: with an arena each, a ResNet-50 at
    224 px held 4.4 GB after one pass of 16 images, and touching it all for the
    first time doubled that pass's time; shared, it holds 1 GB. Results are the
    same: an allocator does not take part in the arithmetic.

    `save_optimized` writes the graph as ONNX Runtime optimised it to that path: what it fused is what it runs.

    `shared` (see SharedWeights) gives initializers by name that the session reads in place of its own copy.
    """
    if opt_level not in OPT_LEVELS:
        raise HardenError(f"unknown graph optimisation level {opt_level!r}; use one of {sorted(OPT_LEVELS)}")
    available = set(ort.get_available_providers())
    missing = [p for p in providers if p not in available]
    if missing:
        raise HardenError(f"ONNX Runtime providers not available here: {missing}; available: {sorted(available)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if shared_arena:
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    if save_optimized:
        options.optimized_model_filepath = save_optimized
    for init in model.graph.initializer if shared else ():
        if init.name in shared:
            options.add_initializer(init.name, shared[init.name])
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    except Exception as err:  # ORT raises its own exception types for unsupported graphs
        raise HardenError(f"ONNX Runtime cannot load the model: {str(err).splitlines()[0]}") from err


@functools.cache
def _register_shared_arena() -> None:
    """Register the process-wide CPU arena with ORT's environment (ORT allows this once per process)."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


class SharedWeights:
    """A model's weights, one copy for every session that runs a part of the model.

    The suffix engine builds one session per fault site, each running the part
    of the model after its site, and each loaded its own copy of every weight
    it runs: a 224 px ResNet-50 campaign's 53 sessions took 7 GB
    (tools/inject_memory.py). Handed `values` (SessionOptions.add_initializer),
    a session's kernels read the one copy, but ONNX Runtime still keeps the
    weights' bytes of the model it was given, which saved 1 GB of the 7. A
    Conv's weight fed as an input from `arrays` keeps nothing and gives the
    same bits (harden.fi.suffix does that); a MatMul or Gemm fed so rounds
    differently from its packed constant, so those stay initializers. Only
    float tensors of at least MIN_ELEMENTS are shared: the rest weigh nothing,
    and a quantised graph's integer weights feed kernels whose arithmetic on
    an AVX2 CPU depends on how they pack them (harden.fi.integer_kernel), so
    they stay each session's own. A caller shares them only where ONNX Runtime
    rewrites no graph (level 'disable'), so that every session runs the
    kernels it would run on its own copy, on the same bytes.
    """

    MIN_ELEMENTS = 1024

    def __init__(self, constants: Mapping[str, np.ndarray]) -> None:
        # the OrtValues read the arrays' memory, so the arrays live as long as the values
        self.arrays = {name: np.ascontiguousarray(value) for name, value in constants.items()
                       if value.size >= self.MIN_ELEMENTS and value.dtype.kind == "f"}
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in self.arrays.items()}


def expose(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `tensors` (float tensors inside the graph)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            present.add(name)
    return copy


def input_name_and_shape(session: ort.InferenceSession) -> tuple[str, list[int | str | None]]:
    """The single image input of a classifier session."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise HardenError(f"expected a model with one image input, found {len(inputs)}: {[i.name for i in inputs]}")
    return inputs[0].name, list(inputs[0].shape)


def run_batched(session: ort.InferenceSession, x: np.ndarray, outputs: Sequence[str] | None = None,
                batch: int = 256, workers: int = 1) -> list[np.ndarray]:
    """Run the session over `x` in batches, `workers` batches at once (harden.graph.parallel), and concatenate
    each output."""
    from harden.graph.parallel import ordered_map

    name, shape = input_name_and_shape(session)
    if shape and isinstance(shape[0], int):
        batch = shape[0]  # a fixed batch dimension (common in zoo models) takes exactly that many
    names = list(outputs) if outputs else None
    parts: list[list[np.ndarray]] = []
    chunks = (x[start:start + batch] for start in range(0, len(x), batch))
    for result in ordered_map(lambda chunk: session.run(names, {name: chunk}), chunks, workers):
        if not parts:
            parts = [[] for _ in result]
        for acc, value in zip(parts, result):
            acc.append(value)
    return [acc[0] if len(acc) == 1 else np.concatenate(acc) for acc in parts]
