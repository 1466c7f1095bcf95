"""torch.export of a classifier or backbone of any family, and ONNX from the exported program.

The batch is always dynamic; the image size is fixed (the configured one) or dynamic. Exporting takes the model's
plain path: the fused window op stays out of the graph (it is an eager-only kernel, see ``WindowBlock._use_fused``),
attention is the explicit softmax path, attention masks are built in the graph for the traced size, or from the
symbolic size when it is dynamic, and the per-size mask cache is neither read nor filled (``BasicLayer.masks``).
"""
import contextlib
import logging
import re
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

from models.swin_transformer import WindowAttentionBase

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
# ONNX's limit on one protobuf file; larger models keep their weights in a side file.
ONNX_FILE_LIMIT = 2 ** 31 - 1


class ExportError(ValueError):
    """A model or option that cannot be exported; the message says what to do instead."""


@contextlib.contextmanager
def _size_oblivious(required: bool) -> Iterator[None]:
    """Lets the tracer reason about sizes without assuming whether they are 1 (a batch of one, one window per row),
    so one graph serves every size. torch.export's ``backed_size_oblivious`` (torch 2.7 and later)."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "backed_size_oblivious"):
        if required:
            raise ExportError(f"torch {torch.__version__} cannot export a dynamic image size (it lacks "
                              "torch.fx.experimental._config.backed_size_oblivious); export the configured size "
                              "(leave out --dynamic-size) or use torch 2.7 or later")
        yield
        return
    with _config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _explicit_attention(model: nn.Module) -> Iterator[None]:
    """Every attention module on the explicit path while the model is traced (same outputs, see
    ``WindowAttentionBase``). The CPU kernel of scaled_dot_product_attention returns its output in a layout its fake
    implementation does not describe: the trace records the reshape after it as a view that is invalid for the
    graph's own strides (torch.onnx then fails), and the exported program asserts a batch other than 1."""
    attention = [m for m in model.modules() if isinstance(m, WindowAttentionBase)]
    chosen = [m.attn_impl for m in attention]
    for module in attention:
        module.attn_impl = "explicit"
    try:
        yield
    finally:
        for module, attn_impl in zip(attention, chosen):
            module.attn_impl = attn_impl


def output_names(model: nn.Module) -> List[str]:
    """``logits`` for a classifier, ``stage{i}`` for each map of a backbone (``WindowTransformer.as_backbone``)."""
    indices = getattr(model, "feature_indices", None)
    return ["logits"] if indices is None else [f"stage{i}" for i in indices]


def export_program(model: nn.Module, image_size: Tuple[int, int], in_chans: int = 3,
                   dynamic_size: bool = False) -> torch.export.ExportedProgram:
    """The model in eval mode, traced by ``torch.export`` for inference (no gradients).

    Args:
        model: a classifier, or a backbone whose forward returns a list of maps.
        image_size: (H, W) of the example input; with a fixed size, the only size the program takes.
        dynamic_size: let H and W vary (from one patch up), as well as the batch.

    Raises:
        ExportError: a dynamic size on a torch that cannot trace one.
    """
    model.eval()
    example = torch.randn(2, in_chans, *image_size)  # a batch of 2: tracing must not take the batch size for a constant
    dims = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    with _size_oblivious(dynamic_size), _explicit_attention(model), torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes={"x": dims})


def _dim_names(program: torch.export.ExportedProgram) -> Dict[str, str]:
    """The tracer's symbol of each dynamic input dimension -> batch, height, width."""
    user_input = next(spec.arg.name for spec in program.graph_signature.input_specs
                      if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT)
    shape = next(node for node in program.graph.nodes if node.name == user_input).meta["val"].shape
    return {str(size): name for size, name in zip(shape, ("batch", None, "height", "width"))
            if name and isinstance(size, torch.SymInt)}


def require_onnx() -> None:
    """Raises ExportError unless onnx and onnxscript (what torch.onnx's exporter translates with) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({error}); install them with "
                          "pip install -r requirements.txt") from error


def save_onnx(program: torch.export.ExportedProgram, path: str, names: Sequence[str]) -> None:
    """Converts an exported program to ONNX (torch.onnx's dynamo exporter) and writes ``path``.

    The input is ``images``, the outputs ``names``; dynamic dimensions are named batch, height and width (and
    expressions of them, for the maps of a backbone).

    Raises:
        ExportError: onnx or onnxscript is not installed.
    """
    require_onnx()
    import onnx

    example = program.example_inputs[0]
    onnx_program = torch.onnx.export(program, example, dynamo=True, input_names=[INPUT_NAME],
                                     output_names=list(names), verbose=False)
    proto = onnx_program.model_proto
    renames = _dim_names(program)
    if renames:
        symbol = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")
        for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = symbol.sub(lambda m: renames[m.group(1)], dim.dim_param)
    large = proto.ByteSize() > ONNX_FILE_LIMIT
    onnx.save_model(proto, path, save_as_external_data=large)
    if large:
        logger.info("the weights exceed ONNX's 2 GB file limit: written beside %s", path)
