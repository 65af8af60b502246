"""Feature-based distillation: the student learns the teacher's intermediate activations, not only its outputs.

Activations are addressed by module path (`model.layers.3`, `features.2.conv`; numeric parts index a ModuleList
or Sequential) and read through forward hooks (`capture`), so any `nn.Module` works and a path is written once.

Losses, for a student feature s and a teacher feature t of the same shape [..., D] (an "item" is one vector of D
numbers: one token's hidden state, one spatial position's channels), all >= 0 and 0 when s == t:

    mse      mean_d (s_d - t_d)^2                                      (FitNets' hint loss, up to its factor 1/2)
    cosine   1 - <s, t> / (|s| |t|)                                    (DistilBERT's cosine embedding loss)
    nmse     mean_d (s_d/|s| - t_d/|t|)^2  =  2 (1 - cos(s, t)) / D    (MSE of L2-normalised vectors: blind to the
                                                                       features' scale, like cosine, on MSE's scale)

each averaged over the selected items (`mask`). Widths that differ are bridged by a learned projection of the
student's feature (FitNets' regressor: a Linear layer, or a 1x1 convolution for conv maps [B, C, H, W]); it is
trained with the student and never exported with it.

Attention: `attention_transfer` is Zagoruyko & Komodakis' (2017) spatial attention for conv maps;
`attention_map_loss` matches the attention probabilities of transformer LMs (MiniLM-style KL per query row).
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distil.errors import DistilError


def _wide(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 activations are upcast; float64 stays float64, e.g. in golden tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()

KINDS = ("mse", "cosine", "nmse")


# ----------------------------------------------------------------------------------------------------------------
# Module paths and hooks


def _unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel: hooks go on the module that really runs, and paths
    are written without DDP's `module.` prefix (so one spec works with 1 process and with many)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule of `model` at a dotted `path` ('' is the model itself); DistilError with the nearest valid
    paths when there is none."""
    model = _unwrap_parallel(model)
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        if not close:  # e.g. 'layers.9' of a model whose paths start 'model.layers.'
            close = [n for n in names if n.endswith(path.split(".")[-1])][:3] or names[:3]
        raise DistilError(f"feature path {path!r}: no such module in {type(model).__name__}; nearest valid paths: "
                          f"{', '.join(close) if close else '(the model has no submodules)'}") from None


def _first_tensor(output: Any, index: int) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if index == 0 else None
    if isinstance(output, (tuple, list)):
        if index == 0:  # the first tensor of the tuple
            return next((o for o in output if isinstance(o, Tensor)), None)
        value = output[index] if index < len(output) else None
        return value if isinstance(value, Tensor) else None
    for name in ("last_hidden_state", "hidden_states"):  # a ModelOutput
        value = getattr(output, name, None)
        if isinstance(value, Tensor) and index == 0:
            return value
    return None


@contextlib.contextmanager
def capture(model: nn.Module, paths: list[str], *, index: int = 0) -> Iterator[dict[str, Tensor]]:
    """Read module outputs during the forward passes run inside the block:

        with capture(student, ["model.layers.0", "model.layers.3"]) as feats:
            out = student(input_ids=ids)
        feats["model.layers.3"]   # that layer's output, with its autograd graph

    A module returning a tuple gives its `index`-th element (default the first tensor: a layer's hidden states;
    index=1 of a Hugging Face attention module is its attention probabilities, with attn_implementation 'eager').
    A module called twice in one forward keeps its last output. Hooks go on the unwrapped model (DDP's `.module`),
    so paths are the same with one process and many; they are removed on exit, also on an exception. All paths
    are resolved before any hook is registered (a bad path changes nothing)."""
    modules = {p: resolve(model, p) for p in paths}
    out: dict[str, Tensor] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            value = _first_tensor(output, index)
            if value is None:
                raise DistilError(f"feature path {path!r}: {type(_module).__name__} returned no tensor at output "
                                  f"index {index} (attention probabilities need attn_implementation='eager')")
            out[path] = value
        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(path)))
        yield out
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# Feature losses


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DistilError(f"feature loss: expected one of {', '.join(KINDS)}, found {kind!r}")


def _items(x: Tensor, mask: Tensor | None) -> Tensor:
    """[..., D] -> [N, D], the items `mask` (bool over the leading dims) selects."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if mask is None else flat[mask.reshape(-1).to(torch.bool)]


def feature_loss(s: Tensor, t: Tensor, kind: str = "mse", mask: Tensor | None = None,
                 reduction: str = "mean") -> Tensor:
    """The feature loss between s and t [..., D] (same shape), over the items `mask` selects (bool over the
    leading dims; None = all), in fp32. Per item (a vector of D numbers):

        mse     mean_d (s_d - t_d)^2
        cosine  1 - cos(s, t)                                  (cos of a zero vector taken as 0)
        nmse    mean_d (s_d/|s| - t_d/|t|)^2 = 2 (1 - cos) / D (the MSE of the L2-normalised vectors)

    reduction 'mean': the mean over the selected items (0 when none is); 'sum': their sum (the training loop
    divides sums by the global item count). No gradient is blocked: pass a detached teacher feature."""
    _check_kind(kind)
    if s.shape != t.shape:
        raise DistilError(f"feature loss: expected student and teacher features of one shape, found "
                          f"{tuple(s.shape)} and {tuple(t.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(s.shape[:-1]):
        raise DistilError(f"feature loss: expected a mask over the leading dims {tuple(s.shape[:-1])}, found "
                          f"{tuple(mask.shape)}")
    a, b = _items(_wide(s), mask), _items(_wide(t), mask)
    if kind == "mse":
        per = (a - b).pow(2).mean(-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    else:  # nmse
        per = (F.normalize(a, dim=-1, eps=1e-8) - F.normalize(b, dim=-1, eps=1e-8)).pow(2).mean(-1)
    if reduction == "sum":
        return per.sum()
    return per.mean() if per.numel() else per.sum()


def make_projection(s_dim: int, t_dim: int, conv: bool = False) -> nn.Module:
    """FitNets' regressor from the student's width to the teacher's: Linear(s_dim, t_dim) for features [..., D],
    a 1x1 Conv2d for conv maps [B, C, H, W]. Equal widths start as the identity (so "with a projection" starts
    exactly where direct matching does); different widths keep PyTorch's default initialisation."""
    layer: nn.Module = nn.Conv2d(s_dim, t_dim, kernel_size=1) if conv else nn.Linear(s_dim, t_dim)
    if s_dim == t_dim:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(t_dim).reshape(layer.weight.shape))
            layer.bias.zero_()
    return layer


@dataclass
class FeaturePair:
    """One matched pair: the student module's output learns the teacher module's output."""

    student: str  # module path in the student
    teacher: str  # module path in the teacher
    loss: str = "mse"  # mse | cosine | nmse
    weight: float = 1.0
    project: bool | None = None  # None: a learned projection only when the widths differ


def _width(shape: tuple[int, ...]) -> int:
    """Conv maps [B, C, H, W] have their width in dim 1; everything else in the last dim."""
    return shape[1] if len(shape) == 4 else shape[-1]


def _channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


class FeatureMatcher(nn.Module):
    """The learned projections of a list of FeaturePairs (a ModuleDict keyed '0', '1', ... by pair index), and the
    weighted sum of their feature losses:  sum_i weight_i * feature_loss(P_i(s_i), t_i).

    `s_shapes` / `t_shapes` give each pair's feature shape (path -> shape, e.g. from one probe forward: see
    `probe`); only the widths are needed to build the projections. A pair whose shapes cannot match without a
    projection when projection is off raises DistilError naming both paths and shapes."""

    def __init__(self, pairs: list[FeaturePair], s_shapes: dict[str, tuple[int, ...]],
                 t_shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.pairs = list(pairs)
        self.proj = nn.ModuleDict()
        for i, pair in enumerate(self.pairs):
            _check_kind(pair.loss)
            s_shape, t_shape = tuple(s_shapes[pair.student]), tuple(t_shapes[pair.teacher])
            s_w, t_w = _width(s_shape), _width(t_shape)
            project = (s_w != t_w) if pair.project is None else pair.project
            if not project and s_shape[1:] != t_shape[1:]:
                raise DistilError(f"feature pair {i}: student {pair.student!r} {list(s_shape)} and teacher "
                                  f"{pair.teacher!r} {list(t_shape)} cannot be matched without a projection; "
                                  f"expected equal shapes, or a learned projection (FitNets regressor)")
            if project:
                self.proj[str(i)] = make_projection(s_w, t_w, conv=len(s_shape) == 4)

    @classmethod
    def probe(cls, pairs: list[FeaturePair], student: nn.Module, teacher: nn.Module, *args: Any,
              **kwargs: Any) -> "FeatureMatcher":
        """Build the matcher from one forward of each model on `*args, **kwargs` (no gradient; modes restored)."""
        shapes = []
        for model, paths in ((student, [p.student for p in pairs]), (teacher, [p.teacher for p in pairs])):
            was = model.training
            model.eval()
            try:
                with torch.no_grad(), capture(model, paths) as feats:
                    model(*args, **kwargs)
            finally:
                model.train(was)
            shapes.append({p: tuple(v.shape) for p, v in feats.items()})
        return cls(pairs, shapes[0], shapes[1])

    def project(self, s_feats: dict[str, Tensor]) -> list[Tensor]:
        """Each pair's student feature, through its projection when it has one (run this inside the DDP forward:
        see distil/methods/features.py)."""
        out = []
        for i, pair in enumerate(self.pairs):
            x = s_feats[pair.student]
            if str(i) in self.proj:
                x = self.proj[str(i)](x)
            out.append(x)
        return out

    def losses(self, projected: list[Tensor], t_feats: dict[str, Tensor], mask: Tensor | None = None,
               reduction: str = "mean") -> list[Tensor]:
        """Each pair's unweighted loss, from `project`'s output and the teacher's captured features."""
        out = []
        for i, (pair, s) in enumerate(zip(self.pairs, projected)):
            t = t_feats[pair.teacher].detach()
            if s.shape != t.shape:
                raise DistilError(f"feature pair {i}: student {pair.student!r} {list(s.shape)} (after projection) and "
                                  f"teacher {pair.teacher!r} {list(t.shape)}: expected equal shapes")
            out.append(feature_loss(_channels_last(s), _channels_last(t), pair.loss, mask, reduction))
        return out

    def forward(self, s_feats: dict[str, Tensor], t_feats: dict[str, Tensor], mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        """sum_i weight_i * loss_i."""
        losses = self.losses(self.project(s_feats), t_feats, mask, reduction)
        return sum((p.weight * x for p, x in zip(self.pairs, losses)), torch.zeros((), device=losses[0].device)
                   if losses else torch.zeros(()))


# ----------------------------------------------------------------------------------------------------------------
# Attention


def spatial_attention(f: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' activation-based spatial attention of conv maps [B, C, H, W]:
    Q = sum_c |F_c|^p, flattened to [B, H*W] and L2-normalised per sample."""
    q = _wide(f).abs().pow(p).sum(1).reshape(f.shape[0], -1)
    return F.normalize(q, dim=1, eps=1e-12)


def attention_transfer(fs: Tensor, ft: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) between conv maps fs [B, Cs, H, W] and ft [B, Ct, H, W]
    (channel counts may differ; spatial sizes may not):

        loss = mean_b || Q_s/||Q_s||_2 - Q_t/||Q_t||_2 ||_2,     Q = sum_c |F_c|^p  (p = 2 by default)

    i.e. the paper's equation (2) with its norm unsquared (p = 2 there is the norm's order). The authors' code
    uses beta/2 * mean of the SQUARED difference with beta = 1000 instead; here that factor is the caller's weight.
    Sum or mean over channels does not matter: Q is normalised."""
    if fs.dim() != 4 or ft.dim() != 4:
        raise DistilError(f"attention transfer: expected conv maps [B, C, H, W], found {list(fs.shape)} and "
                          f"{list(ft.shape)}")
    if fs.shape[0] != ft.shape[0] or fs.shape[2:] != ft.shape[2:]:
        raise DistilError(f"attention transfer: expected equal batch and spatial sizes, found student "
                          f"{list(fs.shape)} and teacher {list(ft.shape)} (pool or interpolate one of them)")
    diff = spatial_attention(fs, p) - spatial_attention(ft, p)
    return torch.linalg.vector_norm(diff, dim=1).mean()


def attention_map_loss(attn_s: Tensor, attn_t: Tensor, mask: Tensor | None = None,
                       heads: str | list[int] = "mean", reduction: str = "mean") -> Tensor:
    """Attention-map transfer for LMs: attention probabilities attn_s [B, Hs, T, T], attn_t [B, Ht, T, T] (each
    row a distribution over keys), compared row by row with KL(teacher row || student row):

        heads='mean'      a_s = mean over student heads, a_t = mean over teacher heads; loss per query row
                          KL(a_t || a_s)
        heads=[j0, j1..]  student head i learns teacher head heads[i] (len(heads) = Hs); loss per query row
                          mean_i KL(attn_t[heads[i]] || attn_s[i])

    `mask` [B, T] (bool, True = a real token) selects the query rows; reduction 'mean' averages over them,
    'sum' adds them up. fp32; 0 * log 0 = 0; a student probability of exactly 0 where the teacher's is not is
    floored at the smallest normal number of its dtype (a large, finite loss)."""
    if attn_s.dim() != 4 or attn_t.dim() != 4 or attn_s.shape[0] != attn_t.shape[0] or \
            attn_s.shape[2:] != attn_t.shape[2:]:
        raise DistilError(f"attention map loss: expected attention probabilities [B, H, T, T] with equal B and T, "
                          f"found student {list(attn_s.shape)} and teacher {list(attn_t.shape)}")
    s, t = _wide(attn_s), _wide(attn_t)
    if heads == "mean":
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    else:
        idx = list(heads)
        if len(idx) != s.shape[1] or any(not 0 <= j < t.shape[1] for j in idx):
            raise DistilError(f"attention map loss: heads: expected {s.shape[1]} teacher head indices in "
                              f"0..{t.shape[1] - 1} (one per student head), found {idx}")
        t = t[:, idx]
    tiny = torch.finfo(s.dtype).tiny
    kl = torch.where(t > 0, t * (t.clamp_min(tiny).log() - s.clamp_min(tiny).log()), 0.0).sum(-1)  # [B, H, T]
    per_row = kl.mean(1)  # [B, T]: heads averaged
    if mask is not None:
        per_row = per_row[mask.to(torch.bool)]
    if reduction == "sum":
        return per_row.sum()
    return per_row.mean() if per_row.numel() else per_row.sum()
