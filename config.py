"""Configuration: yacs defaults, file and command-line merging, derived values.

Every key of the reference release (microsoft/Swin-Transformer) is here with its reference name and
default, so reference config files load unchanged. Keys this framework adds are marked "Beyond the
reference". The flow is always the same: defaults -> files (with their BASE files) -> command-line flags
-> ``--opts`` -> :func:`finalize` (derived values) -> frozen.
"""
import ast
import logging
import os
import tempfile
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from lr_scheduler import SCHEDULERS
from optimizer import OPTIMIZERS

logger = logging.getLogger(__name__)

# 22K pretraining always has this many classes; see finalize().
IMAGENET22K_NUM_CLASSES = 21841

_C = CN()
_C.BASE = [""]  # config files merged before this one, paths relative to this file

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.DATA_PATH = ""
_C.DATA.DATASET = "imagenet"  # imagenet | imagenet22K | folder | shards (tar shards: tools/make_shards.py)
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"  # random | bilinear | bicubic
_C.DATA.ZIP_MODE = False  # read train.zip / val.zip with their map files
_C.DATA.CACHE_MODE = "part"  # no | part | full (zip mode only)
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# SimMIM (TRAIN.OBJECTIVE simmim): the image is cut into MASK_PATCH_SIZE squares, MASK_RATIO of them masked
_C.DATA.MASK_PATCH_SIZE = 32
_C.DATA.MASK_RATIO = 0.6
# Beyond the reference:
_C.DATA.MAX_BAD_FRACTION = 0.01  # stop when more than this fraction of the images read are unreadable
_C.DATA.PREPARE_DIGITS = False  # write the scikit-learn digits demo set into DATA_PATH if it is missing or empty
# auto (device on CUDA, else workers) | workers (loader workers decode and augment with PIL) | device (workers read
# bytes; JPEG decoding and the whole transform run on the training device in batches), see data/pipelines.py
_C.DATA.PIPELINE = "auto"

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = "swin"  # key of the model registry, see models/build.py
_C.MODEL.NAME = "swin_tiny_patch4_window7_224"  # names the output folder
_C.MODEL.PRETRAINED = ""  # checkpoint to fine-tune from (weights only)
_C.MODEL.RESUME = ""  # training checkpoint to continue from (everything)
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1  # stochastic depth at the last block; grows linearly from 0
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN.WINDOW_SIZE = 7
_C.MODEL.SWIN.MLP_RATIO = 4.0
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None  # None: head_dim ** -0.5
_C.MODEL.SWIN.APE = False  # absolute position embedding
_C.MODEL.SWIN.PATCH_NORM = True
# Beyond the reference:
# auto (explicit for CPU training, else sdpa) | sdpa (scaled_dot_product_attention) | explicit (softmax written out)
# | flex (FlexAttention in windows) | flex_grid (FlexAttention on the whole map, no roll/partition); the flex paths
# have no backward on the CPU. See models/swin_transformer.py WindowAttentionBase and README, Performance.
_C.MODEL.SWIN.ATTN_IMPL = "auto"

# Swin V2 (MODEL.TYPE swinv2)
_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.0
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]  # per stage, the window the position bias was trained with
# Beyond the reference:
_C.MODEL.SWINV2.ATTN_IMPL = "auto"  # as MODEL.SWIN.ATTN_IMPL

# Swin-MLP (MODEL.TYPE swin_mlp)
_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.0
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True

# SimMIM pretraining (TRAIN.OBJECTIVE simmim): reconstruct locally normalised pixels instead of raw ones
_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47  # odd side of the normalisation window

# Beyond the reference:
_C.MODEL.PRETRAINED_CLASS_MAP = ""  # text file: for each class of this model, the row of the pretrained head
_C.MODEL.EMA = CN()
_C.MODEL.EMA.ENABLE = False  # keep an exponential moving average of the weights (timm ModelEmaV3)
_C.MODEL.EMA.DECAY = 0.9998

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4  # for a total batch of 512; scaled linearly in finalize()
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0  # max gradient norm; 0 disables clipping
_C.TRAIN.AUTO_RESUME = True  # continue from the newest valid checkpoint in the output folder
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing per block

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine | linear | step | multistep
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step: factor per decay
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True  # cosine only: the decay starts after warmup instead of at step 0
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1  # multistep: factor per milestone
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []  # multistep: milestone epochs

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw | sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # sgd only

_C.TRAIN.LAYER_DECAY = 1.0  # layer-wise learning-rate decay for fine-tuning; 1.0 is off

# Beyond the reference:
_C.TRAIN.SAVE_ITERS = 0  # also save every this many optimizer steps (0: only at epoch ends)
_C.TRAIN.KEEP_CHECKPOINTS = 3  # newest checkpoints kept, plus the best
_C.TRAIN.MAX_SKIPPED_STEPS = 20  # float16: stop after this many skipped (non-finite) steps in a row
# torch.compile the model before DDP wrapping: None (auto: per device, see compilation.py) | True | False
_C.TRAIN.COMPILE = None
_C.TRAIN.COMPILE_MODE = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
_C.TRAIN.COMPILE_BACKEND = "inductor"  # torch.compile backend (aot_eager: traces without generating code, to debug)
_C.TRAIN.COMPILE_CACHE_DIR = ""  # compiled code kept across runs; "" = ~/.cache/swin_transformer/inductor
# Beyond the reference:
_C.TRAIN.FSDP = False  # shard parameters, gradients and optimizer states across processes (FSDP2); see fsdp.py
# classification (labels) | simmim (masked image modelling, no labels; main_simmim_pt.py sets it), see objectives.py
_C.TRAIN.OBJECTIVE = "classification"

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm policy string; "none" disables
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8  # mixup alpha; 0 disables
_C.AUG.CUTMIX = 1.0  # cutmix alpha; 0 disables
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"  # batch | pair | elem
# Beyond the reference:
_C.AUG.HFLIP = 0.5  # horizontal flip probability of the training transform (the reference always uses 0.5)

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.CROP = True  # resize to 256/224 of the size, then center crop; else resize to the size
_C.TEST.SEQUENTIAL = False
_C.TEST.SHUFFLE = False
# Beyond the reference:
_C.TEST.AMP_ENABLE = None  # validation precision; None follows AMP_ENABLE

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
_C.ENABLE_AMP = False  # reference alias of AMP_ENABLE, kept so old files load
_C.AMP_ENABLE = True  # mixed precision
_C.AMP_OPT_LEVEL = ""  # deprecated apex setting; only "O0" has an effect (disables AMP)
_C.OUTPUT = "output"  # root; the run writes to OUTPUT/MODEL.NAME/TAG
_C.TAG = "default"
_C.SAVE_FREQ = 1  # epochs between checkpoints
_C.PRINT_FREQ = 10  # steps between progress lines
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.FUSED_WINDOW_PROCESS = False  # fused roll + window partition kernel, see kernels/window_process
_C.FUSED_LAYERNORM = False  # accepted for compatibility: torch's LayerNorm is already one fused kernel
# Beyond the reference:
_C.AMP_DTYPE = "bfloat16"  # float16 (with a gradient scaler) | bfloat16


class ConfigError(ValueError):
    """A config file, flag or value that cannot be used; the message says where and how to fix it."""


# Command-line flag (argparse dest) -> (config key, value to set; None means the flag's own value).
FLAG_TO_KEY = {
    "batch_size": ("DATA.BATCH_SIZE", None),
    "data_path": ("DATA.DATA_PATH", None),
    "zip": ("DATA.ZIP_MODE", True),
    "cache_mode": ("DATA.CACHE_MODE", None),
    "pretrained": ("MODEL.PRETRAINED", None),
    "resume": ("MODEL.RESUME", None),
    "accumulation_steps": ("TRAIN.ACCUMULATION_STEPS", None),
    "use_checkpoint": ("TRAIN.USE_CHECKPOINT", True),
    "amp_opt_level": ("AMP_OPT_LEVEL", None),
    "disable_amp": ("AMP_ENABLE", False),
    "amp_dtype": ("AMP_DTYPE", None),
    "output": ("OUTPUT", None),
    "tag": ("TAG", None),
    "eval": ("EVAL_MODE", True),
    "throughput": ("THROUGHPUT_MODE", True),
    "fused_window_process": ("FUSED_WINDOW_PROCESS", True),
    "fused_layernorm": ("FUSED_LAYERNORM", True),
    "optim": ("TRAIN.OPTIMIZER.NAME", None),
    "compile": ("TRAIN.COMPILE", True),
    "fsdp": ("TRAIN.FSDP", True),
    "local_rank": ("LOCAL_RANK", None),
}


# The training objectives (see objectives.py) and the model families SimMIM can pretrain.
OBJECTIVES = ("classification", "simmim")
SIMMIM_MODEL_TYPES = ("swin", "swinv2")


class Valid:
    """What one config key accepts: a kind of value, optionally a range, choices, a list length or a check.

    Args:
        kind: ``int``, ``float`` (ints accepted), ``bool``, ``str``, or a list of one of them: ``ints``,
            ``floats``, ``strs``.
        low, high: the range of a number, or of every item of a list (inclusive unless ``*_open``).
        choices: the valid values, or a function that returns them (looked up only when checked).
        optional: None is accepted too.
        length: the exact length of a list; ``min_length`` the shortest.
        ignore_case: choices compare lower-cased (optimizer names, as the reference reads them).
        test: a function returning what is wrong with a value, or None when it is fine.
        hint: how to fix a bad value, added to the message.
        flag: the command-line flag that sets the key, named in the message.
    """

    def __init__(self, kind: str, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = False, choices: Any = None, optional: bool = False, length: Optional[int] = None,
                 min_length: int = 0, ignore_case: bool = False, test: Optional[Callable[[Any], Optional[str]]] = None,
                 hint: str = "", flag: str = ""):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.choices, self.optional, self.length, self.min_length = choices, optional, length, min_length
        self.ignore_case, self.test, self.hint, self.flag = ignore_case, test, hint, flag

    def check(self, key: str, value: Any) -> None:
        """Raises ConfigError naming ``key``, what it accepts and ``value`` when the value is not valid."""
        problem = self._problem(value)
        if problem:
            flag = f" ({self.flag})" if self.flag else ""
            hint = f" ({self.hint})" if self.hint else ""
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key}{flag} must be {problem}; got {shown!r}{hint}")

    def _problem(self, value: Any) -> Optional[str]:
        if value is None:
            return None if self.optional else f"{self._kind_name()} (not None)"
        is_list = self.kind in ("ints", "floats", "strs")
        if is_list:
            if not isinstance(value, (list, tuple)) or not all(_is_kind(v, self.kind[:-1]) for v in value):
                return self._kind_name()
            if self.length is not None and len(value) != self.length:
                return f"a list of {self.length} {_PLURALS[self.kind]}"
            if len(value) < self.min_length:
                return f"a list of at least {self.min_length} {_PLURALS[self.kind]}"
        elif not _is_kind(value, self.kind):
            return self._kind_name()
        if not all(self._in_range(v) for v in (value if is_list else [value])):
            if is_list and self._range_name() == "a positive number":
                return self._kind_name()
            if is_list:
                count = f"{self.length} " if self.length is not None else ""
                return f"a list of {count}{_PLURALS[self.kind]}, each {self._range_name()}"
            return self._range_name()
        choices = self.choices() if callable(self.choices) else self.choices
        if choices is not None:
            candidate = value.lower() if self.ignore_case and isinstance(value, str) else value
            if candidate not in choices:
                return f"one of {', '.join(map(str, choices))}"
        return self.test(value) if self.test else None

    def _in_range(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def _kind_name(self) -> str:
        names = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}
        positive = "positive " if self.low is not None and self._range_name() == "a positive number" else ""
        name = names.get(self.kind) or f"a list of {positive}{_PLURALS[self.kind]}"
        return name + (" or None" if self.optional else "")

    def _range_name(self) -> str:
        if self.high is None and (self.low == 0 and self.low_open or self.low == 1 and self.kind.startswith("int")):
            return "a positive number"
        if self.high is None and self.low == 0:
            return "0 or more"
        parts = []
        if self.low is not None:
            parts.append(f"{'above' if self.low_open else 'at least'} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'below' if self.high_open else 'at most'} {_number(self.high)}")
        return " and ".join(parts)


_PLURALS = {"ints": "integers", "floats": "numbers", "strs": "strings"}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str}[kind])


def _auto_augment_problem(policy: str) -> Optional[str]:
    """What timm's parser finds wrong with an AUG.AUTO_AUGMENT policy string, or None ("none" and "" disable it)."""
    if policy in ("", "none"):
        return None
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    build = rand_augment_transform if policy.startswith("rand") else \
        augment_and_mix_transform if policy.startswith("augmix") else auto_augment_transform
    try:
        build(policy, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as error:
        detail = f" (timm: {error})" if str(error) else ""
        return f"none, or a timm augmentation policy such as rand-m9-mstd0.5-inc1, augmix-m5 or v0{detail}"
    return None


def _int(low: Optional[float] = None, high: Optional[float] = None, **kw: Any) -> Valid:
    return Valid("int", low, high, **kw)


def _float(low: Optional[float] = None, high: Optional[float] = None, **kw: Any) -> Valid:
    return Valid("float", low, high, **kw)


def _choice(*choices: Any, **kw: Any) -> Valid:
    return Valid("str", choices=choices, **kw)


_BOOL, _STR = Valid("bool"), Valid("str")
_FRACTION = _float(0, 1)  # a probability
_RATE = _float(0, 1, high_open=True)  # a drop or smoothing rate: 1 would remove everything
_INTERPOLATIONS = ("random", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _attn_impls() -> tuple:
    """The attention paths of the window attention families (imported when checked, as the model types are)."""
    from models.swin_transformer import ATTN_IMPLS

    return ATTN_IMPLS


def _compile_modes() -> tuple:
    from compilation import COMPILE_MODES  # it imports torch: only when checked

    return COMPILE_MODES


def _compile_backends() -> list:
    """torch.compile's registered backends, debugging ones (aot_eager) included."""
    from torch._dynamo import list_backends

    return list_backends(exclude_tags=())


def _family(has_qk_scale: bool = False, has_qkv_bias: bool = True, v2: bool = False,
            attention: bool = True) -> dict:
    """The entries of one model family's section (MODEL.SWIN, MODEL.SWINV2 or MODEL.SWIN_MLP), without prefix."""
    entries = {"PATCH_SIZE": _int(1), "IN_CHANS": _int(1), "EMBED_DIM": _int(1),
               "DEPTHS": Valid("ints", 1, min_length=1), "NUM_HEADS": Valid("ints", 1, min_length=1),
               "WINDOW_SIZE": _int(1), "MLP_RATIO": _float(0, low_open=True), "APE": _BOOL, "PATCH_NORM": _BOOL}
    if has_qkv_bias:
        entries["QKV_BIAS"] = _BOOL
    if has_qk_scale:
        entries["QK_SCALE"] = _float(0, low_open=True, optional=True)
    if v2:
        entries["PRETRAINED_WINDOW_SIZES"] = Valid("ints", 0)
    if attention:
        entries["ATTN_IMPL"] = Valid("str", choices=lambda: _attn_impls())
    return entries


# Every config key -> what it accepts. _check tests every key against it, and a key of the defaults without an
# entry stops every run (tests/test_config.py checks that none is missing), so a new key cannot skip the check.
# Values that depend on other keys (stage lists of one length, heads dividing widths, the image size against the
# stages, SimMIM's mask grid) are checked after it.
VALID: Dict[str, Valid] = {
    "BASE": Valid("strs"),
    "DATA.BATCH_SIZE": _int(1), "DATA.DATA_PATH": _STR,
    "DATA.DATASET": _choice("imagenet", "imagenet22K", "folder", "shards"), "DATA.IMG_SIZE": _int(1),
    "DATA.INTERPOLATION": _choice(*_INTERPOLATIONS), "DATA.ZIP_MODE": _BOOL,
    "DATA.CACHE_MODE": _choice("no", "part", "full"), "DATA.PIN_MEMORY": _BOOL, "DATA.NUM_WORKERS": _int(0),
    "DATA.MASK_PATCH_SIZE": _int(1),
    "DATA.MASK_RATIO": _float(0, 1, low_open=True, high_open=True, hint="the fraction of mask squares masked"),
    "DATA.MAX_BAD_FRACTION": _FRACTION, "DATA.PREPARE_DIGITS": _BOOL,
    "DATA.PIPELINE": _choice("auto", "workers", "device"),
    "MODEL.TYPE": Valid("str", choices=lambda: _model_types()),
    "MODEL.NAME": Valid("str", test=lambda v: None if v else "a name (it names the output folder)"),
    "MODEL.PRETRAINED": _STR, "MODEL.RESUME": _STR, "MODEL.NUM_CLASSES": _int(1),
    "MODEL.DROP_RATE": _RATE, "MODEL.DROP_PATH_RATE": _RATE, "MODEL.LABEL_SMOOTHING": _RATE,
    **{f"MODEL.SWIN.{k}": v for k, v in _family(has_qk_scale=True).items()},
    **{f"MODEL.SWINV2.{k}": v for k, v in _family(v2=True).items()},
    **{f"MODEL.SWIN_MLP.{k}": v for k, v in _family(has_qkv_bias=False, attention=False).items()},
    "MODEL.SIMMIM.NORM_TARGET.ENABLE": _BOOL, "MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE": _int(1),
    "MODEL.PRETRAINED_CLASS_MAP": _STR, "MODEL.EMA.ENABLE": _BOOL, "MODEL.EMA.DECAY": _FRACTION,
    "TRAIN.START_EPOCH": _int(0), "TRAIN.EPOCHS": _int(0), "TRAIN.WARMUP_EPOCHS": _int(0),
    "TRAIN.WEIGHT_DECAY": _float(0), "TRAIN.BASE_LR": _float(0), "TRAIN.WARMUP_LR": _float(0),
    "TRAIN.MIN_LR": _float(0), "TRAIN.CLIP_GRAD": _float(0, hint="0 turns clipping off"), "TRAIN.AUTO_RESUME": _BOOL,
    "TRAIN.ACCUMULATION_STEPS": _int(1), "TRAIN.USE_CHECKPOINT": _BOOL,
    "TRAIN.LR_SCHEDULER.NAME": _choice(*SCHEDULERS), "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": _int(0),
    "TRAIN.LR_SCHEDULER.DECAY_RATE": _float(0, low_open=True), "TRAIN.LR_SCHEDULER.WARMUP_PREFIX": _BOOL,
    "TRAIN.LR_SCHEDULER.GAMMA": _float(0, low_open=True), "TRAIN.LR_SCHEDULER.MULTISTEPS": Valid("floats", 0),
    "TRAIN.OPTIMIZER.NAME": _choice(*OPTIMIZERS, ignore_case=True, flag="--optim"),
    "TRAIN.OPTIMIZER.EPS": _float(0, low_open=True),
    "TRAIN.OPTIMIZER.BETAS": Valid("floats", 0, 1, high_open=True, length=2, hint="AdamW's two decay rates, e.g. "
                                                                                  "[0.9, 0.999]"),
    "TRAIN.OPTIMIZER.MOMENTUM": _FRACTION, "TRAIN.LAYER_DECAY": _float(0, 1, low_open=True, hint="1.0 turns it off"),
    "TRAIN.SAVE_ITERS": _int(0), "TRAIN.KEEP_CHECKPOINTS": _int(0, hint="0 keeps every checkpoint"),
    "TRAIN.MAX_SKIPPED_STEPS": _int(0), "TRAIN.COMPILE": Valid("bool", optional=True, hint="None: auto"),
    "TRAIN.COMPILE_MODE": Valid("str", choices=lambda: _compile_modes()),
    "TRAIN.COMPILE_BACKEND": Valid("str", choices=lambda: _compile_backends()), "TRAIN.COMPILE_CACHE_DIR": _STR,
    "TRAIN.FSDP": _BOOL,
    "TRAIN.OBJECTIVE": _choice(*OBJECTIVES),
    "AUG.COLOR_JITTER": _float(0), "AUG.AUTO_AUGMENT": Valid("str", test=_auto_augment_problem),
    "AUG.REPROB": _FRACTION, "AUG.REMODE": _choice("const", "rand", "pixel"), "AUG.RECOUNT": _int(1),
    "AUG.MIXUP": _float(0), "AUG.CUTMIX": _float(0),
    "AUG.CUTMIX_MINMAX": Valid("floats", 0, 1, length=2, optional=True),
    "AUG.MIXUP_PROB": _FRACTION, "AUG.MIXUP_SWITCH_PROB": _FRACTION, "AUG.MIXUP_MODE": _choice("batch", "pair", "elem"),
    "AUG.HFLIP": _FRACTION,
    "TEST.CROP": _BOOL, "TEST.SEQUENTIAL": _BOOL, "TEST.SHUFFLE": _BOOL,
    "TEST.AMP_ENABLE": Valid("bool", optional=True),
    "ENABLE_AMP": _BOOL, "AMP_ENABLE": _BOOL, "AMP_OPT_LEVEL": _choice("", "O0", "O1", "O2"),
    "OUTPUT": Valid("str", test=lambda v: None if v else "a folder (not empty)"), "TAG": _STR,
    "SAVE_FREQ": _int(1), "PRINT_FREQ": _int(1), "SEED": _int(0, 2 ** 32 - 1), "EVAL_MODE": _BOOL,
    "THROUGHPUT_MODE": _BOOL, "LOCAL_RANK": _int(0), "FUSED_WINDOW_PROCESS": _BOOL, "FUSED_LAYERNORM": _BOOL,
    "AMP_DTYPE": _choice("float16", "bfloat16"),
}


def get_defaults() -> CN:
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Checks ``value`` against the default's type; ints are accepted for floats, lists for tuples."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise ConfigError(
        f"{source}: {key} must be of type {type(default).__name__} like its default {default!r}, "
        f"got {value!r} ({type(value).__name__})")


def _merge(node: CN, values: dict, source: str, prefix: str = "") -> None:
    """Merges a plain dict into ``node`` recursively, naming ``source`` in every error."""
    for name, value in values.items():
        key = prefix + name
        if name == "BASE" and not prefix:
            continue
        if name not in node:
            raise ConfigError(f"{source}: unknown config key {key}. Check its spelling against config.py.")
        if isinstance(node[name], CN):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} is a section and needs a mapping of keys, got {value!r}")
            _merge(node[name], value, source, key + ".")
        else:
            node[name] = _coerce(value, node[name], key, source)


def _decode(value: Any) -> Any:
    """Turns strings that spell Python literals (1e-3, [2, 2], None) into values, as yacs does."""
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def merge_file(config: CN, path: str, _chain: Sequence[str] = ()) -> None:
    """Merges a YAML file into ``config``, its BASE files first (relative to the file).

    Raises:
        ConfigError: a missing file, an include cycle, an unknown key or a value of the wrong type.
    """
    path = os.path.abspath(path)
    if path in _chain:
        cycle = " -> ".join(list(_chain) + [path])
        raise ConfigError(f"config files include each other in a cycle: {cycle}")
    if not os.path.isfile(path):
        included_by = f" (listed in BASE of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{included_by}")
    with open(path) as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of KEY: value, got {type(values).__name__}")
    for base in _base_files(values.get("BASE"), path):
        merge_file(config, os.path.join(os.path.dirname(path), base), list(_chain) + [path])
    _merge(config, _decode(values), path)


def _base_files(base: Any, path: str) -> list:
    """The files a config file's ``BASE`` lists: a list of paths, or one path written as a plain string."""
    if base is None or base == "":
        return []
    if isinstance(base, str):
        return [base]
    if isinstance(base, list) and all(isinstance(item, str) for item in base):
        return [item for item in base if item]
    raise ConfigError(f"{path}: BASE must list config files to merge first, e.g. BASE: [base.yaml]; got {base!r}")


def _lookup(config: CN, key: str) -> Any:
    """The current value at a dotted key, or None where the key does not exist."""
    node = config
    for name in key.split("."):
        if not isinstance(node, CN) or name not in node:
            return None
        node = node[name]
    return node


def merge_opts(config: CN, opts: Sequence[str], source: str = "--opts") -> None:
    """Merges ``KEY VALUE`` pairs such as ``("TRAIN.EPOCHS", "30")``."""
    if len(opts) % 2:
        raise ConfigError(f"{source}: expects KEY VALUE pairs, got an odd number of items: {list(opts)}")
    for key, text in zip(opts[0::2], opts[1::2]):
        *parents, name = key.split(".")
        value = _decode(text)
        if isinstance(_lookup(config, key), str) and not isinstance(value, str):
            value = text  # a string key takes the text as written, e.g. TAG 2024
        values: dict = {name: value}
        for parent in reversed(parents):
            values = {parent: values}
        _merge(config, values, source)


def merge_args(config: CN, args: Any) -> None:
    """Applies command-line flags through :data:`FLAG_TO_KEY`; flags left unset change nothing."""
    for flag, (key, value) in FLAG_TO_KEY.items():
        given = getattr(args, flag, None)
        if given is None or given is False:
            continue
        merge_opts(config, [key, repr(given if value is None else value)], source=f"--{flag}")
    if getattr(args, "opts", None):
        merge_opts(config, args.opts)


def _check(config: CN) -> None:
    """Rejects values that would fail later, with the key, the valid values and a way to fix it.

    Every key is checked against its entry in :data:`VALID` (type, range, choices), then the values that
    depend on each other. Everything that can be known from the config alone is checked here, before any data
    is read.
    """
    flat = _flatten(config)
    missing = sorted(set(flat) - set(VALID))
    if missing:  # a key added to the defaults without its entry: a mistake in this file, not the user's
        raise ConfigError(f"config keys without an entry in config.VALID: {', '.join(missing)}")
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):  # --eval and --throughput train nothing
        _int(1).check("TRAIN.EPOCHS", config.TRAIN.EPOCHS)
    for key, value in flat.items():
        VALID[key].check(key, value)
    minmax = config.AUG.CUTMIX_MINMAX
    if minmax is not None and not minmax[0] < minmax[1]:
        raise ConfigError(f"AUG.CUTMIX_MINMAX must be [lowest, highest] box fractions with lowest < highest, or "
                          f"None; got {list(minmax)!r}")
    _check_swin(config)
    _check_schedule(config)
    _check_objective(config)


def _flatten(node: CN, prefix: str = "") -> dict:
    """``{"TRAIN.EPOCHS": 300, ...}`` for every key of ``node``."""
    flat: dict = {}
    for name, value in node.items():
        if isinstance(value, CN):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _model_types() -> list:
    """The registered ``MODEL.TYPE`` names; imported here so that importing this module stays light."""
    from models.build import registered_model_types

    return registered_model_types()


# MODEL.TYPE -> the MODEL section that holds the family's architecture keys.
MODEL_SECTIONS = {"swin": "SWIN", "swinv2": "SWINV2", "swin_mlp": "SWIN_MLP"}


def _check_swin(config: CN) -> None:
    """Stage lists of one length, heads that divide each stage's width and an image size every stage can work on,
    in the section of the chosen model family (MODEL.SWIN, MODEL.SWINV2 or MODEL.SWIN_MLP)."""
    section = MODEL_SECTIONS.get(config.MODEL.TYPE, "SWIN")
    swin, prefix = config.MODEL[section], f"MODEL.{section}"
    if len(swin.DEPTHS) != len(swin.NUM_HEADS):
        raise ConfigError(f"{prefix}.DEPTHS {list(swin.DEPTHS)} ({len(swin.DEPTHS)} stages) and "
                          f"{prefix}.NUM_HEADS {list(swin.NUM_HEADS)} ({len(swin.NUM_HEADS)} entries) need one "
                          "entry per stage each")
    if "PRETRAINED_WINDOW_SIZES" in swin:
        sizes = list(swin.PRETRAINED_WINDOW_SIZES)
        # Entries beyond the last stage are ignored, as the reference does (the default lists four).
        if len(sizes) < len(swin.DEPTHS):
            raise ConfigError(f"{prefix}.PRETRAINED_WINDOW_SIZES must list one window (0: none) per stage, "
                              f"{len(swin.DEPTHS)} for {prefix}.DEPTHS {list(swin.DEPTHS)}; got {sizes!r}")
    for stage, heads in enumerate(swin.NUM_HEADS):
        dim = swin.EMBED_DIM * 2 ** stage
        if dim % heads:
            raise ConfigError(f"{prefix}.NUM_HEADS[{stage}] = {heads} must divide the width of stage {stage} "
                              f"({prefix}.EMBED_DIM {swin.EMBED_DIM} x 2^{stage} = {dim})")
    # Each stage after the first halves the map of PATCH_SIZE patches; the last one needs at least one token.
    min_size = encoder_stride(config)
    if config.DATA.IMG_SIZE < min_size:
        raise ConfigError(f"DATA.IMG_SIZE {config.DATA.IMG_SIZE} is too small: with {prefix}.PATCH_SIZE "
                          f"{swin.PATCH_SIZE} and {len(swin.DEPTHS)} stages it must be at least {min_size}")


def encoder_stride(config: CN) -> int:
    """Image pixels per token of the last stage: PATCH_SIZE x 2^(stages - 1) of the chosen family."""
    swin = config.MODEL[MODEL_SECTIONS.get(config.MODEL.TYPE, "SWIN")]
    return swin.PATCH_SIZE * 2 ** (len(swin.DEPTHS) - 1)


def _check_schedule(config: CN) -> None:
    """Values that only the chosen learning-rate schedule uses."""
    sched = config.TRAIN.LR_SCHEDULER
    if sched.NAME == "step" and sched.DECAY_EPOCHS <= 0:
        raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be a positive number for the step schedule, "
                          f"got {sched.DECAY_EPOCHS}")
    if sched.NAME == "multistep" and sched.MULTISTEPS:
        steps = list(sched.MULTISTEPS)
        if steps != sorted(steps):
            raise ConfigError(f"TRAIN.LR_SCHEDULER.MULTISTEPS must be epochs in increasing order, got {steps!r}")
        # The reference asserts this too: a milestone inside the warmup would be overwritten by it.
        if steps[0] < config.TRAIN.WARMUP_EPOCHS:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.MULTISTEPS {steps} starts inside the warmup: every milestone "
                              f"must be at least TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS})")




def _check_objective(config: CN) -> None:
    """For SimMIM: a model family it can pretrain, and a mask grid that fits the image, the patches and the
    decoder, which rebuilds the image from tokens of the last stage."""
    if config.TRAIN.OBJECTIVE != "simmim":
        return
    if config.MODEL.TYPE not in SIMMIM_MODEL_TYPES:
        raise ConfigError(f"SimMIM pretraining needs MODEL.TYPE {' or '.join(SIMMIM_MODEL_TYPES)}; got "
                          f"{config.MODEL.TYPE!r}")
    mask_patch, size = config.DATA.MASK_PATCH_SIZE, config.DATA.IMG_SIZE
    patch = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]].PATCH_SIZE
    if size % mask_patch or mask_patch % patch:
        raise ConfigError(f"DATA.MASK_PATCH_SIZE {mask_patch} must divide DATA.IMG_SIZE {size} and be a multiple "
                          f"of the model's PATCH_SIZE {patch}, e.g. --opts DATA.MASK_PATCH_SIZE {patch}")
    stride = encoder_stride(config)
    if size % stride:
        fits = " or ".join(str(n * stride) for n in (size // stride, size // stride + 1) if n > 0)
        raise ConfigError(f"DATA.IMG_SIZE {size} must be a multiple of {stride} for SimMIM: the decoder rebuilds "
                          f"the image from the last stage's tokens, each {stride} px wide (PATCH_SIZE {patch} x "
                          f"2^(stages - 1)); e.g. --opts DATA.IMG_SIZE {fits}")
    norm = config.MODEL.SIMMIM.NORM_TARGET
    if norm.ENABLE and (norm.PATCH_SIZE <= 1 or norm.PATCH_SIZE % 2 == 0):
        raise ConfigError(f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be an odd number above 1 (a window centred on "
                          f"each pixel); got {norm.PATCH_SIZE}")


def finalize(config: CN, world_size: int = 1) -> CN:
    """Computes every derived value, checks the result and freezes the config for good.

    Derived: the effective learning rates (scaled linearly by the global batch over 512, as the
    reference does), the output folder ``OUTPUT/MODEL.NAME/TAG``, AMP from its deprecated aliases and
    the 22K class count.
    """
    _check(config)
    if config.ENABLE_AMP:
        config.AMP_ENABLE = True
    if config.AMP_OPT_LEVEL == "O0":
        config.AMP_ENABLE = False
    if config.TEST.AMP_ENABLE is None:
        config.TEST.AMP_ENABLE = config.AMP_ENABLE
    if config.DATA.DATASET == "imagenet22K" and config.MODEL.NUM_CLASSES == _C.MODEL.NUM_CLASSES:
        # Reference 22K configs leave NUM_CLASSES at its default and rely on the data to set it.
        config.MODEL.NUM_CLASSES = IMAGENET22K_NUM_CLASSES
    scale = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS / 512.0
    config.TRAIN.BASE_LR *= scale
    config.TRAIN.WARMUP_LR *= scale
    config.TRAIN.MIN_LR *= scale
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


def prepare_output_dir(path: str) -> None:
    """Creates the run folder ``path`` and checks that a file can be written in it, before any data is read.

    Raises:
        ConfigError: the folder cannot be created or written to; the message names it and the blocking file.
    """
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        where = os.path.abspath(path)
        blocker = where
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        reason = f"{blocker} is a file, not a folder" if os.path.isfile(blocker) else (error.strerror or str(error))
        raise ConfigError(f"cannot create or write the run folder {where}: {reason}. Give --output (OUTPUT) a "
                          "folder you can write to; the run writes to OUTPUT/MODEL.NAME/TAG.") from error


def load_config(path: Optional[str] = None, opts: Iterable[str] = (), args: Any = None,
                world_size: int = 1) -> CN:
    """Builds the frozen config: defaults, the file at ``path``, flags in ``args``, ``opts`` overrides.

    Args:
        path: YAML file (None: defaults only).
        opts: ``KEY VALUE`` overrides applied last.
        args: parsed command-line flags (see :data:`FLAG_TO_KEY`), or None.
        world_size: number of processes, for the learning-rate scaling.
    """
    config = get_defaults()
    if path:
        merge_file(config, path)
    file_data_path = config.DATA.DATA_PATH
    if args is not None:
        merge_args(config, args)
    merge_opts(config, list(opts))
    # The demo set is prepared only in the config file's own folder: a run pointed at another folder from the
    # command line trains on that folder, and a mistyped path fails instead of filling up with digits.
    command_line_keys = (list(opts) + list(getattr(args, "opts", None) or []))[0::2]
    if config.DATA.DATA_PATH != file_data_path and "DATA.PREPARE_DIGITS" not in command_line_keys:
        config.DATA.PREPARE_DIGITS = False
    return finalize(config, world_size)


def to_yaml(config: CN) -> str:
    """The resolved config as YAML text (for the output folder and checkpoints)."""
    return config.dump()


def from_yaml(text: str) -> CN:
    """Reads back a config written by :func:`to_yaml` (already finalized), frozen."""
    config = get_defaults()
    _merge(config, yaml.safe_load(text), "saved config")
    config.freeze()
    return config
