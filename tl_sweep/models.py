"""torchvision models as data: block partitions, heads, freezing, parameter groups and weights.

Every torchvision classification family is one row of :data:`FAMILIES`. A row lists the family's
ordered *blocks* (stem → … → last stage) as regular expressions over parameter names, in the spirit of
timm's ``group_matcher``, and the dotted path of its classifier (the *head*). One generic function,
:func:`partition`, turns a built model and its row into ordered parameter groups; nothing else in the
package knows what a ResNet or a ViT looks like.

What a block is, so that "k unfrozen blocks" means the same thing across families:

* CNNs: the stem, then one block per stage of constant resolution (ResNet 5, RegNet 5, ConvNeXt 5,
  DenseNet 5, EfficientNet 5, MobileNet 5-6, Swin 5...), plus hidden fully connected layers (VGG, AlexNet,
  MobileNetV3, MaxViT's pre-logits), which are blocks of their own.
* ViT: the patch embedding (with class token and position embedding), then one block per encoder layer.

``unfrozen_blocks = k`` trains the new head plus exactly the last ``k`` blocks; the rest is frozen:
``requires_grad=False``, BatchNorm and Dropout in eval mode, and - because no input of a frozen block
requires grad - its forward records no autograd graph.

Block matcher syntax (one regex per block, matched against parameter names with ``re.match``):

* ``(?P<n>...)`` expands one pattern into one block per distinct value (ordered numerically), like
  timm's ``r'^layer(\\d+)'``;
* a leading ``+`` attaches the match to the previous block (timm's ``MATCH_PREV_GROUP``), for a final norm;
* :class:`SplitAt` splits a ``Sequential`` into stages after each module of a type (VGG's max-pools).

Heads: ``linear`` (default) is a new ``nn.Linear`` (or 1x1 conv for SqueezeNet) with Xavier-uniform
weights and zero bias, as in the d2l fine-tuning recipe; ``mlp`` is hidden layer + ReLU + dropout +
output (the VGG16 Keras recipe on pooled features); ``binary`` is one logit trained with BCE, for
two-class targets. Auxiliary heads (GoogLeNet ``aux1/aux2``, Inception-v3 ``AuxLogits``) are removed:
transfer recipes turn them off, and their keys are ignored when loading a checkpoint.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torchvision
from torch import nn

from tl_sweep.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SplitAt:
    """Blocks = the children of ``container`` split after each module whose class is ``after``."""

    container: str
    after: str = "MaxPool2d"


@dataclass(frozen=True)
class Family:
    name: str
    archs: str  # regex over torchvision model names
    blocks: tuple[str | SplitAt, ...]
    head: str  # dotted path of the classifier layer that is replaced
    input_size: int = 224
    build: dict[str, Any] = field(default_factory=dict)  # builder kwargs when no torchvision weights
    ignore: str | None = None  # checkpoint keys dropped on load (auxiliary heads)
    identity: tuple[str, ...] = ()  # modules after the head replaced by nn.Identity
    size_kwarg: str | None = None  # builder kwarg that sets the input size (ViT, MaxViT)


_STAGES5 = (r"^features\.0\.", r"^features\.1\.", r"^features\.[23]\.", r"^features\.[45]\.", r"^features\.[67]\.")

# fmt: off
FAMILIES: tuple[Family, ...] = (
    Family("resnet", r"^(resnet|resnext|wide_resnet)\d", (r"^(conv1|bn1)\.", r"^layer(?P<n>\d+)\."), head="fc"),
    Family("regnet", r"^regnet_", (r"^stem\.", r"^trunk_output\.block1\.", r"^trunk_output\.block2\.",
                                   r"^trunk_output\.block3\.", r"^trunk_output\.block4\."), head="fc"),
    Family("alexnet", r"^alexnet$", (SplitAt("features"), r"^classifier\.[0-2]\.", r"^classifier\.[3-5]\."),
           head="classifier.6", input_size=224),
    Family("vgg", r"^vgg\d+(_bn)?$", (SplitAt("features"), r"^classifier\.[0-2]\.", r"^classifier\.[3-5]\."),
           head="classifier.6"),
    Family("squeezenet", r"^squeezenet", (SplitAt("features"),), head="classifier.1", identity=("classifier.2",)),
    Family("densenet", r"^densenet", (r"^features\.(conv0|norm0)\.", r"^features\.(denseblock1|transition1)\.",
                                      r"^features\.(denseblock2|transition2)\.",
                                      r"^features\.(denseblock3|transition3)\.", r"^features\.(denseblock4|norm5)\."),
           head="classifier"),
    Family("efficientnet", r"^efficientnet_", (r"^features\.[01]\.", r"^features\.2\.", r"^features\.3\.",
                                               r"^features\.[45]\.", r"^features\.[6-8]\."), head="classifier.1"),
    Family("mobilenet_v2", r"^mobilenet_v2$", (r"^features\.[01]\.", r"^features\.[23]\.", r"^features\.[4-6]\.",
                                               r"^features\.([7-9]|1[0-3])\.", r"^features\.1[4-8]\."),
           head="classifier.1"),
    Family("mobilenet_v3_large", r"^mobilenet_v3_large$",
           (r"^features\.[01]\.", r"^features\.[23]\.", r"^features\.[4-6]\.", r"^features\.([7-9]|1[0-2])\.",
            r"^features\.1[3-6]\.", r"^classifier\.[0-2]\."), head="classifier.3"),
    Family("mobilenet_v3_small", r"^mobilenet_v3_small$",
           (r"^features\.[01]\.", r"^features\.[23]\.", r"^features\.[4-8]\.", r"^features\.(9|1[0-2])\.",
            r"^classifier\.[0-2]\."), head="classifier.3"),
    Family("mnasnet", r"^mnasnet", (r"^layers\.[0-7]\.", r"^layers\.8\.", r"^layers\.9\.", r"^layers\.1[01]\.",
                                    r"^layers\.1[2-6]\."), head="classifier.1"),
    Family("shufflenet_v2", r"^shufflenet_v2_", (r"^conv1\.", r"^stage2\.", r"^stage3\.", r"^(stage4|conv5)\."),
           head="fc"),
    Family("googlenet", r"^googlenet$", (r"^conv[123]\.", r"^inception3", r"^inception4", r"^inception5"),
           head="fc", build={"aux_logits": False, "init_weights": False}, ignore=r"^aux[12]\."),
    Family("inception", r"^inception_v3$", (r"^Conv2d_", r"^Mixed_5", r"^Mixed_6", r"^Mixed_7"), head="fc",
           input_size=299, build={"aux_logits": False, "init_weights": False}, ignore=r"^AuxLogits\."),
    Family("convnext", r"^convnext_", _STAGES5 + (r"+^classifier\.0\.",), head="classifier.2"),
    Family("swin", r"^swin_", _STAGES5 + (r"+^norm\.",), head="head"),
    Family("maxvit", r"^maxvit_", (r"^stem\.", r"^blocks\.(?P<n>\d+)\.", r"^classifier\.[2-4]\."),
           head="classifier.5", size_kwarg="input_size"),
    Family("vit", r"^vit_", (r"^(conv_proj|class_token|encoder\.pos_embedding)",
                             r"^encoder\.layers\.encoder_layer_(?P<n>\d+)\.", r"+^encoder\.ln\."),
           head="heads.head", size_kwarg="image_size"),
)
# fmt: on

HEADS = ("linear", "mlp", "binary")


def list_archs() -> list[str]:
    """Every torchvision classification model name."""
    return torchvision.models.list_models(module=torchvision.models)


def family(arch: str) -> Family:
    """The table row for ``arch``; an unknown name raises :class:`UserError` with close matches."""
    archs = list_archs()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "`tl-sweep models` lists them"
        raise UserError(f"unknown torchvision model {arch!r}: {hint}")
    for fam in FAMILIES:
        if re.match(fam.archs, arch):
            return fam
    raise AssertionError(f"{arch} is a torchvision model that no family row covers")  # a gap in FAMILIES


def weight_names(arch: str) -> list[str]:
    """The names of ``arch``'s torchvision weights enum (``IMAGENET1K_V1``, ..., ``DEFAULT``)."""
    return list(torchvision.models.get_model_weights(arch).__members__)


def torchvision_weights(arch: str, name: str):
    """The Weights enum member ``name`` of ``arch``, or ``None`` when ``name`` is not an enum name."""
    return torchvision.models.get_model_weights(arch).__members__.get(name)


# --------------------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Partition:
    """A built model's blocks (ordered, each a list of regexes) and its head path."""

    blocks: tuple[tuple[re.Pattern, ...], ...]
    head: str

    def __len__(self) -> int:
        return len(self.blocks)

    def block_of(self, name: str) -> int | None:
        """Index of the block that parameter or module ``name`` belongs to; ``None`` for the head/outside."""
        if name == self.head or name.startswith(self.head + "."):
            return None
        key = name if name.endswith(".") or "." in name else name + "."
        for i, patterns in enumerate(self.blocks):
            if any(p.match(key) for p in patterns):
                return i
        return None


def _expand(pattern: str, names: Iterable[str]) -> list[str]:
    """One pattern per distinct value of its ``(?P<n>...)`` group, ordered numerically when numbers."""
    start = pattern.find("(?P<n>")
    if start < 0:
        return [pattern]
    depth, end = 0, start
    for end in range(start, len(pattern)):
        depth += {"(": 1, ")": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    values = {m.group("n") for n in names if (m := re.match(pattern, n))}
    ordered = sorted(values, key=lambda v: (0, int(v), v) if v.isdigit() else (1, 0, v))
    return [pattern[:start] + re.escape(v) + pattern[end + 1:] for v in ordered]


def _split_at(model: nn.Module, split: SplitAt) -> list[str]:
    container = model.get_submodule(split.container)
    stages, current = [], []
    for idx, (name, child) in enumerate(container.named_children()):
        current.append(name)
        if type(child).__name__ == split.after or idx == len(container) - 1:
            stages.append(current)
            current = []
    prefix = re.escape(split.container)
    return [rf"^{prefix}\.({'|'.join(stage)})\." for stage in stages]


def partition(model: nn.Module, arch: str) -> Partition:
    """Ordered blocks of ``model`` (built by :func:`build` or torchvision) from its family row."""
    fam = family(arch)
    names = [n for n, _ in model.named_parameters()]
    blocks: list[list[str]] = []
    for matcher in fam.blocks:
        if isinstance(matcher, SplitAt):
            blocks.extend([p] for p in _split_at(model, matcher))
        elif matcher.startswith("+"):
            blocks[-1].append(matcher[1:])
        else:
            blocks.extend([p] for p in _expand(matcher, names))
    compiled = tuple(tuple(re.compile(p) for p in b) for b in blocks)
    # Blocks that hold no parameter in this variant (a pool-only stage) are not blocks.
    kept = tuple(b for b in compiled if any(any(p.match(n) for p in b) for n in names))
    return Partition(kept, fam.head)


@functools.lru_cache(maxsize=None)
def num_blocks(arch: str, image_size: int | None = None) -> int:
    """How many blocks ``arch`` has (the ``max`` of ``unfrozen_blocks``)."""
    fam = family(arch)
    if all(isinstance(b, str) and "(?P<n>" not in b for b in fam.blocks):
        return sum(1 for b in fam.blocks if not b.startswith("+"))
    with torch.device("meta"):
        model = _build_bare(arch, 1000, image_size)
    return len(partition(model, arch))


# ---------------------------------------------------------------------------------------- building


def _build_bare(arch: str, num_classes: int, image_size: int | None) -> nn.Module:
    fam = family(arch)
    kwargs = dict(fam.build, num_classes=num_classes)
    if fam.size_kwarg and image_size:  # MaxViT's input_size is (h, w); ViT's image_size an int
        kwargs[fam.size_kwarg] = (image_size, image_size) if fam.size_kwarg == "input_size" else image_size
    return torchvision.models.get_model(arch, **kwargs)


def _new_head(old: nn.Module, out: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    conv = isinstance(old, nn.Conv2d)
    width = old.in_channels if conv else old.in_features

    def layer(i: int, o: int) -> nn.Module:
        m = nn.Conv2d(i, o, 1) if conv else nn.Linear(i, o)
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
        return m

    if kind == "mlp":
        return nn.Sequential(layer(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), layer(hidden, out))
    return layer(width, out)


def replace_head(model: nn.Module, arch: str, num_classes: int, kind: str = "linear", *,
                 hidden: int = 1024, dropout: float = 0.5) -> nn.Module:
    """Swap ``arch``'s classifier for a new one with ``num_classes`` outputs (1 logit for ``binary``)."""
    fam = family(arch)
    out = 1 if kind == "binary" else num_classes
    parent, _, leaf = fam.head.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, leaf, _new_head(model.get_submodule(fam.head), out, kind, hidden, dropout))
    for path in fam.identity:
        p, _, l = path.rpartition(".")
        setattr(model.get_submodule(p), l, nn.Identity())
    return model


def head_parameters(model: nn.Module, arch: str) -> list[str]:
    head = family(arch).head
    return [n for n, _ in model.named_parameters() if n == head or n.startswith(head + ".")]


# ----------------------------------------------------------------------------------------- weights


def hub_file(weights) -> Path:
    """Where torchvision looks for (and caches) a Weights enum's file: ``$TORCH_HOME/hub/checkpoints/``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def check_weights(arch: str, weights: str) -> None:
    """Fail early, in one line, when a torchvision weights name is not valid or not available offline."""
    enum = torchvision_weights(arch, weights)
    if enum is None:
        raise UserError(f"model.weights: {weights!r} is not a weights name of {arch}; valid: "
                        f"{', '.join(weight_names(arch))}, a checkpoint path, source:<name> or none")
    path = hub_file(enum)
    if not path.exists():
        try:  # a machine with internet fetches it as torchvision would
            torch.hub.download_url_to_file(enum.url, str(path), progress=False)
        except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
            path.unlink(missing_ok=True)
            raise UserError(f"model.weights: {arch} {weights} is not cached and could not be downloaded "
                            f"({type(exc).__name__}); put {enum.url} at {path}") from None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file: a bare state dict or one under ``state_dict``/``model``.

    Loaded with ``weights_only=True`` (no code in the file runs); ``module.`` prefixes (DataParallel/DDP)
    are stripped.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"model.weights: checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and unpickler errors all mean "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.weights: {path} is not a loadable PyTorch checkpoint ({first[:160]}); "
                        f"save one with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model.weights: {path} holds no state dict (expected a dict of tensors, "
                        f"or one under 'state_dict' or 'model')")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _names(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone(model: nn.Module, arch: str, path: str | Path) -> None:
    """Load every non-head tensor of a checkpoint into ``model``; mismatches are named in one line."""
    fam = family(arch)
    state = read_checkpoint(path)
    head = fam.head + "."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    theirs = {k: v for k, v in state.items()
              if not k.startswith(head) and not (fam.ignore and re.match(fam.ignore, k))}
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise UserError(f"model.weights: {path} is not a {arch} checkpoint: {'; '.join(parts)}; "
                        f"use a checkpoint saved from torchvision's {arch}")
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if theirs[k].shape != v.shape]
    if shapes:
        raise UserError(f"model.weights: {path} does not fit {arch}: shape of {_names(shapes, 2)}; "
                        f"it was saved from another variant")
    model.load_state_dict(theirs, strict=False)


def build(arch: str, num_classes: int, *, weights: str = "none", weights_file: str | None = None,
          head: str = "linear", image_size: int | None = None, hidden: int = 1024,
          dropout: float = 0.5) -> nn.Module:
    """A torchvision ``arch`` with its pretrained ``weights`` and a new head for ``num_classes``.

    Args:
        weights: a torchvision weights name of ``arch`` (``DEFAULT``, ``IMAGENET1K_V1``...), ``none``, or
            anything else with ``weights_file`` set (a checkpoint path or a ``source:<name>`` model
            already resolved to its file by the caller).
        image_size: the input size for families whose shape depends on it (ViT, MaxViT) when they are
            built without torchvision weights.
    """
    enum = torchvision_weights(arch, weights) if weights != "none" else None
    if enum is not None:
        check_weights(arch, weights)
        model = torchvision.models.get_model(arch, weights=enum)
    else:
        model = _build_bare(arch, num_classes, image_size)
        if weights_file:
            load_backbone(model, arch, weights_file)
    return replace_head(model, arch, num_classes, head, hidden=hidden, dropout=dropout)


_BUILT: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}  # per process, oldest first
BUILT_KEEP = 4  # models kept per worker: a study's worker alternates between a few (arm, seed) pairs


def build_seeded(arch: str, num_classes: int, seed: int, **kwargs) -> nn.Module:
    """:func:`build` right after ``torch.manual_seed(seed)``, remembered per process.

    A reused trial worker builds the same model for many trials (a search repeat's trials share their seed);
    the first build is kept and later ones are copies of it, with the random generator left where the build
    left it, so a trial is bit for bit the same whether or not its worker built that model before (a
    ResNet18's initialisation costs 75 ms per trial; the copy ~10 ms). A weights file given as bytes is not
    remembered.
    """
    import copy

    file = kwargs.get("weights_file")
    key = None if hasattr(file, "read") else (arch, num_classes, seed, tuple(sorted(kwargs.items())))
    if key in _BUILT:
        model, rng = _BUILT.pop(key)
        _BUILT[key] = model, rng  # most recently used last
        torch.manual_seed(seed)  # every device's generator, as a build does; the CPU one where the build left it
        torch.random.set_rng_state(rng)
        return copy.deepcopy(model)
    torch.manual_seed(seed)
    model = build(arch, num_classes, **kwargs)
    if key is not None:
        _BUILT[key] = copy.deepcopy(model), torch.random.get_rng_state()
        while len(_BUILT) > BUILT_KEEP:
            _BUILT.pop(next(iter(_BUILT)))
    return model


def kept_bytes() -> int:
    """Bytes of the built models this process keeps for its next trials (:func:`build_seeded`)."""
    return sum(t.nbytes for m, _ in _BUILT.values() for t in (*m.parameters(), *m.buffers()))


def input_spec(arch: str, weights: str) -> dict[str, Any]:
    """Crop size, resize size and normalisation from the weights' metadata, else the family default."""
    enum = torchvision_weights(arch, weights) if weights != "none" else None
    if enum is not None:
        t = enum.transforms()
        return {"crop": t.crop_size[0], "resize": t.resize_size[0], "mean": tuple(t.mean), "std": tuple(t.std)}
    size = family(arch).input_size
    return {"crop": size, "resize": round(size / 0.875), "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


# ------------------------------------------------------------------------------------------ freezing


@dataclass
class Frozen:
    """The result of :func:`freeze`: which blocks train and which modules must stay in eval mode."""

    trainable_blocks: list[int]
    eval_modules: list[nn.Module]

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()`` but BatchNorm/Dropout of frozen blocks stay in eval mode."""
        model.train()
        for m in self.eval_modules:
            m.eval()


def freeze(model: nn.Module, part: Partition, unfrozen_blocks: int) -> Frozen:
    """Train the head plus the last ``unfrozen_blocks`` blocks; freeze everything else."""
    n = len(part)
    if not 0 <= unfrozen_blocks <= n:
        raise UserError(f"unfrozen_blocks={unfrozen_blocks} is outside 0..{n} for this model")
    first = n - unfrozen_blocks
    for name, p in model.named_parameters():
        block = part.block_of(name)
        p.requires_grad_(block is None or block >= first)
    frozen_mods = []
    for name, m in model.named_modules():
        if not name or len(list(m.children())):
            continue  # leaves only: a container may span frozen and trained blocks
        block = part.block_of(name + ".")
        if block is not None and block < first:
            frozen_mods.append(m)
    return Frozen(list(range(first, n)), frozen_mods)


def param_groups(model: nn.Module, part: Partition, frozen: Frozen, *, lr: float, weight_decay: float,
                 head_lr_mult: float = 1.0, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: head at ``head_lr_mult`` × ``lr``, block i at ``layer_decay**(n-i)`` × lr.

    Like timm's ``param_groups_layer_decay``: a pure function returning plain dicts; norms and biases
    (``ndim <= 1``) get no weight decay.
    """
    n = len(part)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = part.block_of(name)
        scale = head_lr_mult if block is None else layer_decay ** (n - block)
        key = ("head" if block is None else f"block{block}", p.ndim > 1)
        g = groups.setdefault(key, {"params": [], "lr": lr * scale, "lr_scale": scale, "name": key[0],
                                    "weight_decay": weight_decay if p.ndim > 1 else 0.0})
        g["params"].append(p)
    return list(groups.values())
