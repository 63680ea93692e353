"""The inference form of a trained EfficientNet: BatchNorm and proxy norm folded away (docs/inference.md).

:func:`inference_form` turns a trained network (any variant: BatchNorm, GroupNorm, LayerNorm + proxy norm) into a
network that computes the same eval-mode function with less work, built from the trained modules' parameters and
buffers alone (their state-dict keys are the contract; the training modules are not changed):

- **Proxy norm is frozen.** Its mean ``m`` and inverse std ``s`` depend only on parameters (the 200-point
  quadrature of :mod:`models.proxy_norm`), so they are computed once, in the same fp32 arithmetic, and kept as
  constants. Its inner affine (gamma, beta) becomes the affine of the affine-free GroupNorm in front of it.
- **BatchNorm folds into the conv before it** (running statistics and affine into weight and bias).
- **Proxy norm's output affine** ``(a - m) * s`` is folded into the next linear op wherever that is exact:

  - a 1x1 conv without padding takes both (``W' = W diag(s)``, ``b' = b - W' m``): the Fused-MBConv projection,
    and the SE gate's first conv, which sees the spatial mean, so ``mean(a - m) = mean(a) - m``;
  - the classifier after global average pooling takes the head's ``- m`` the same way;
  - the MBConv projection sees ``(a - m) * gate * s``: ``s`` goes into its weights, and ``- m``, multiplied by the
    per-sample gate, becomes a per-sample bias ``-(W' diag(m)) gate`` (a [N, C] x [C, C'] product instead of a pass
    over the whole activation);
  - a zero-padded kxk conv takes only the scale ``s``: scaling commutes with zero padding, but a shift does not
    (the padded border would hold ``0`` where the training form sees ``-m * s``), so ``- m`` stays an explicit
    subtraction in front of it. The stem's output also feeds the first block's residual when it has one; then
    nothing is folded out of it.

GroupNorm and LayerNorm still compute per-sample statistics at inference (one reduction over each sample's
activation per norm, then the normalising pass); unlike BatchNorm they cannot fold into a conv. docs/inference.md
has the measured cost. The weights file that rebuilds this form is :mod:`models.exported_file`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet import EfficientNet, FusedMBConv, MBConv, SqueezeExcite
from .layout import channel_view
from .norms import NormAct, ScaleOnlyNorm
from .proxy_norm import ProxyNormActivation


# ------------------------------------------------------------------------------------------- building blocks
class NormSiLU(nn.Module):
    """``silu(norm(x))`` then an optional per-channel ``* scale`` and ``+ shift`` (what proxy norm leaves over).

    ``norm`` is a GroupNorm with its affine (GN/LN, and LN + proxy norm with the proxy norm's gamma/beta), or
    ``nn.Identity`` where a BatchNorm was folded into the conv before.
    """

    scale: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]

    def __init__(self, norm: nn.Module, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None):
        super().__init__()
        self.norm = norm
        self.register_buffer("scale", None if scale is None else channel_view(scale.float()).clone())
        self.register_buffer("shift", None if shift is None else channel_view(shift.float()).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        # In place on the norm's fresh output (not on x, which Identity passes through): on a CPU every new
        # activation-sized tensor costs a pass of page faults, as much as the arithmetic (docs/performance.md).
        y = F.silu(y, inplace=not isinstance(self.norm, nn.Identity))
        if self.scale is not None:
            y = y.mul_(self.scale.to(y.dtype))
        if self.shift is not None:
            y = y.add_(self.shift.to(y.dtype))
        return y


class InferenceMBConv(nn.Module):
    """MBConv in inference form: ``[conv_pw, act1], conv_dw, act2, se, conv_pwl (- gate correction), norm3, + x``."""

    conv_pw: nn.Conv2d
    act1: nn.Module
    gate_correction: Optional[torch.Tensor]

    def __init__(self, conv_pw: Optional[nn.Conv2d], act1: Optional[nn.Module], conv_dw: nn.Conv2d,
                 act2: nn.Module, se: SqueezeExcite, conv_pwl: nn.Conv2d, gate_correction: Optional[torch.Tensor],
                 norm3: nn.Module, has_residual: bool):
        super().__init__()
        self.expands = conv_pw is not None
        if conv_pw is not None and act1 is not None:
            self.conv_pw, self.act1 = conv_pw, act1
        self.conv_dw, self.act2, self.se, self.conv_pwl, self.norm3 = conv_dw, act2, se, conv_pwl, norm3
        self.register_buffer("gate_correction", gate_correction)  # [C_out, C_mid]: W' diag(m), or None
        self.has_residual = has_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.conv_pw(x)) if self.expands else x
        out = self.act2(self.conv_dw(out))
        gate = self.se(out)
        out = self.conv_pwl(out * gate)
        if self.gate_correction is not None:
            out = out.sub_(channel_view(F.linear(gate.flatten(1), self.gate_correction.to(gate.dtype))))
        out = self.norm3(out)
        return x + out if self.has_residual else out


class InferenceFusedMBConv(nn.Module):
    """Fused-MBConv in inference form: ``conv_fused, act1, [conv_pwl, norm3], + x``."""

    conv_pwl: nn.Conv2d
    norm3: nn.Module

    def __init__(self, conv_fused: nn.Conv2d, act1: nn.Module, conv_pwl: Optional[nn.Conv2d],
                 norm3: Optional[nn.Module], has_residual: bool):
        super().__init__()
        self.conv_fused, self.act1 = conv_fused, act1
        self.projects = conv_pwl is not None
        if conv_pwl is not None and norm3 is not None:
            self.conv_pwl, self.norm3 = conv_pwl, norm3
        self.has_residual = has_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.conv_fused(x))
        if self.projects:
            out = self.norm3(self.conv_pwl(out))
        return x + out if self.has_residual else out


class InferenceEfficientNet(nn.Module):
    """The folded network. Module names keep the training form's split points (``stem``, ``blocks.<s>.<i>``,
    ``head``, ``classifier``), so IPU pipeline stages apply to it unchanged. Input: normalised float NCHW."""

    def __init__(self, stem: nn.Sequential, blocks: nn.Sequential, head: nn.Sequential, classifier: nn.Linear):
        super().__init__()
        self.stem, self.blocks, self.head, self.classifier = stem, blocks, head, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


# --------------------------------------------------------------------------------------------------- folding
@dataclass(frozen=True)
class ProxyAffine:
    """What proxy norm applies after the activation: ``(a - mean) * scale`` (``scale`` None: centring only)."""

    mean: torch.Tensor
    scale: Optional[torch.Tensor]


def _copy_conv(conv: nn.Module) -> nn.Conv2d:
    """A float32 copy of ``conv`` that always has a bias (zeros where it had none), detached from training."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected a Conv2d in the trained network, found {type(conv).__name__}")
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                    conv.dilation, conv.groups, bias=True)  # type: ignore[arg-type]
    with torch.no_grad():
        new.weight.copy_(conv.weight.float())
        _bias(new).copy_(conv.bias.float() if conv.bias is not None else torch.zeros(conv.out_channels))
    return new.requires_grad_(False)


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    assert conv.bias is not None  # every conv of the inference form has one (_copy_conv)
    return conv.bias


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """BatchNorm (eval: running statistics) after ``conv`` folded into its weight and bias, in float64."""
    assert bn.running_mean is not None and bn.running_var is not None
    gain = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
    gain = gain / torch.sqrt(bn.running_var.double() + bn.eps)
    offset = bn.bias.double() if bn.affine else torch.zeros_like(gain)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.double() * gain.view(-1, 1, 1, 1))
        _bias(conv).copy_((_bias(conv).double() - bn.running_mean.double()) * gain + offset)


def _grouped(conv: nn.Conv2d) -> Tuple[int, int, int]:
    groups = conv.groups
    return groups, conv.out_channels // groups, conv.in_channels // groups


def _scale_inputs(conv: nn.Conv2d, scale: torch.Tensor) -> None:
    """``conv(x * scale)`` as ``conv'(x)``: exact for any kernel, since scaling commutes with zero padding."""
    groups, out_per_group, in_per_group = _grouped(conv)
    w = conv.weight.double().view(groups, out_per_group, in_per_group, *conv.weight.shape[2:])
    with torch.no_grad():
        conv.weight.copy_((w * scale.double().view(groups, 1, in_per_group, 1, 1)).view_as(conv.weight))


def _input_shift_response(conv: nn.Conv2d, shift: torch.Tensor) -> torch.Tensor:
    """Per output channel, what ``conv`` adds for a constant input ``shift`` per channel (without padding)."""
    groups, out_per_group, in_per_group = _grouped(conv)
    w = conv.weight.double().sum((2, 3)).view(groups, out_per_group, in_per_group)
    return torch.einsum("goi,gi->go", w, shift.double().view(groups, in_per_group)).reshape(-1)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.padding == (0, 0)


def _fold_affine_into(conv: nn.Conv2d, affine: Optional[ProxyAffine]) -> Optional[torch.Tensor]:
    """Fold a producer's proxy-norm affine into ``conv`` (the input's only consumer) as far as it is exact: the
    scale always; the shift only into a 1x1 conv without padding. Returns the mean the producer must still
    subtract (None when nothing is left)."""
    if affine is None:
        return None
    if affine.scale is not None:
        _scale_inputs(conv, affine.scale)
    if not _is_pointwise(conv):
        return affine.mean  # zero padding: the shift is not exact at the borders (module docstring)
    with torch.no_grad():
        _bias(conv).copy_(_bias(conv).double() - _input_shift_response(conv, affine.mean))
    return None


def _proxy_affine(act: ProxyNormActivation) -> ProxyAffine:
    """The frozen statistics, computed by the training module itself (same fp32 quadrature)."""
    with torch.no_grad():
        mean, inv_std = act.proxy_stats()
    return ProxyAffine(mean.detach().clone(), None if act.mode == "center_only" else inv_std.detach().clone())


def _group_norm(norm: nn.GroupNorm, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> nn.GroupNorm:
    """A GroupNorm with the given affine (the training norm's own, or the proxy norm's gamma/beta)."""
    new = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=True)
    with torch.no_grad():
        new.weight.copy_(weight.float() if weight is not None else torch.ones(norm.num_channels))
        new.bias.copy_(bias.float() if bias is not None else torch.zeros(norm.num_channels))
    return new.requires_grad_(False)


def _norm(norm: nn.Module, conv: nn.Conv2d, weight: Optional[torch.Tensor] = None,
          bias: Optional[torch.Tensor] = None) -> nn.Module:
    """The inference norm after ``conv``: BatchNorm folds into ``conv`` (Identity); GroupNorm stays, with
    ``weight``/``bias`` as its affine when given (proxy norm's, a scale-only norm's), else its own."""
    if isinstance(norm, nn.BatchNorm2d):
        if weight is not None or bias is not None:  # proxy norm needs a batch-independent norm (models/norms.py)
            raise TypeError("no inference form for a BatchNorm under an outside affine")
        _fold_batch_norm(conv, norm)
        return nn.Identity()
    if not isinstance(norm, nn.GroupNorm):
        raise TypeError(f"no inference form for the norm {type(norm).__name__}")
    if weight is None and bias is None and norm.affine:
        weight, bias = norm.weight, norm.bias
    return _group_norm(norm, weight, bias)


def _norm_act(unit: nn.Module, conv: nn.Conv2d) -> Tuple[nn.Module, Optional[ProxyAffine]]:
    """A training ``NormAct`` after ``conv`` as (norm + swish module, the proxy-norm affine still to place)."""
    if not isinstance(unit, NormAct):
        raise TypeError(f"expected a NormAct in the trained network, found {type(unit).__name__}")
    act = unit.act
    if isinstance(act, ProxyNormActivation):
        return _norm(unit.norm, conv, act.weight, act.bias), _proxy_affine(act)
    return _norm(unit.norm, conv), None


def _projection_norm(norm: nn.Module, conv: nn.Conv2d) -> nn.Module:
    if isinstance(norm, ScaleOnlyNorm):
        return _norm(norm.norm, conv, norm.weight, None)
    return _norm(norm, conv)


def _norm_silu_with_affine(norm: nn.Module, affine: Optional[ProxyAffine]) -> NormSiLU:
    """Norm + swish applying the whole proxy-norm affine itself (its output has more than one consumer)."""
    if affine is None:
        return NormSiLU(norm)
    if affine.scale is None:
        return NormSiLU(norm, shift=-affine.mean)
    return NormSiLU(norm, scale=affine.scale, shift=-affine.mean * affine.scale)


def _norm_silu_minus_mean(norm: nn.Module, mean_left: Optional[torch.Tensor]) -> NormSiLU:
    """Norm + swish, then minus the proxy-norm mean its consumer could not take (it took the scale)."""
    return NormSiLU(norm, shift=None if mean_left is None else -mean_left)


def _mbconv(block: MBConv, incoming: Optional[ProxyAffine]) -> Tuple[InferenceMBConv, Optional[torch.Tensor]]:
    """The block, taking what it can of ``incoming`` (the proxy-norm affine of its input, given only where the
    input has no other consumer), and the mean its producer must still subtract."""
    conv_dw = _copy_conv(block.conv_dw)
    conv_pw = act1 = None
    if block.expands:
        conv_pw = _copy_conv(block.conv_pw)
        mean_left = _fold_affine_into(conv_pw, incoming)
        norm1, affine1 = _norm_act(block.norm1, conv_pw)
        act1 = _norm_silu_minus_mean(norm1, _fold_affine_into(conv_dw, affine1))
    else:
        mean_left = _fold_affine_into(conv_dw, incoming)
    norm2, affine2 = _norm_act(block.norm2, conv_dw)
    se = copy.deepcopy(block.se).float().requires_grad_(False)
    conv_pwl = _copy_conv(block.conv_pwl)
    correction = None
    if affine2 is not None:
        # The SE branch sees mean(a - m): its first 1x1 conv takes the -m. The projection sees (a - m) * gate * s:
        # it takes s, and the -m times the per-sample gate becomes a per-sample bias.
        _fold_affine_into(se.fc1, ProxyAffine(affine2.mean, None))
        assert affine2.scale is not None  # deferred_scale mode
        _scale_inputs(conv_pwl, affine2.scale)
        correction = (conv_pwl.weight.double()[:, :, 0, 0] * affine2.mean.double()[None, :]).float()
    norm3 = _projection_norm(block.norm3, conv_pwl)
    return InferenceMBConv(conv_pw, act1, conv_dw, NormSiLU(norm2), se, conv_pwl, correction, norm3,
                           block.has_residual), mean_left


def _fused(block: FusedMBConv,
           incoming: Optional[ProxyAffine]) -> Tuple[InferenceFusedMBConv, Optional[torch.Tensor]]:
    """As :func:`_mbconv`, for a Fused-MBConv block."""
    conv_fused = _copy_conv(block.conv_fused)
    mean_left = _fold_affine_into(conv_fused, incoming)
    norm1, affine1 = _norm_act(block.norm1, conv_fused)
    if not block.projects:
        act1 = _norm_silu_with_affine(norm1, affine1)
        return InferenceFusedMBConv(conv_fused, act1, None, None, block.has_residual), mean_left
    conv_pwl = _copy_conv(block.conv_pwl)
    act1 = _norm_silu_minus_mean(norm1, _fold_affine_into(conv_pwl, affine1))
    norm3 = _projection_norm(block.norm3, conv_pwl)
    return InferenceFusedMBConv(conv_fused, act1, conv_pwl, norm3, block.has_residual), mean_left


def _block(block: nn.Module, incoming: Optional[ProxyAffine] = None) -> Tuple[nn.Module, Optional[torch.Tensor]]:
    if isinstance(block, MBConv):
        return _mbconv(block, incoming)
    if isinstance(block, FusedMBConv):
        return _fused(block, incoming)
    raise TypeError(f"no inference form for the block {type(block).__name__}")


def inference_form(model: EfficientNet) -> InferenceEfficientNet:
    """The folded eval-mode network of ``model`` (see the module docstring); ``model`` is left as it was."""
    if not isinstance(model, EfficientNet):
        raise TypeError(f"inference_form takes an EfficientNet, not {type(model).__name__}")
    parts = dict(model.named_modules())
    stem_conv = _copy_conv(parts["stem.conv"])
    stem_norm, stem_affine = _norm_act(parts["stem.norm"], stem_conv)
    stages = [list(stage.children()) for stage in model.blocks.children()]
    first_block = stages[0][0]
    stem_act = _norm_silu_with_affine(stem_norm, stem_affine)
    if stem_affine is not None and not first_block.has_residual:
        # The first block is the stem output's only consumer: it takes what it can of the affine.
        first, mean_left = _block(first_block, stem_affine)
        stem_act = _norm_silu_minus_mean(stem_norm, mean_left)
    else:
        first, _ = _block(first_block)
    stem = nn.Sequential()
    stem.add_module("conv", stem_conv)
    stem.add_module("act", stem_act)
    blocks = nn.Sequential(*[
        nn.Sequential(*[first if (s, i) == (0, 0) else _block(b)[0] for i, b in enumerate(stage)])
        for s, stage in enumerate(stages)])
    head_conv = _copy_conv(parts["head.conv"])
    head_norm, head_affine = _norm_act(parts["head.norm"], head_conv)
    head = nn.Sequential()
    head.add_module("conv", head_conv)
    head.add_module("act", NormSiLU(head_norm))
    classifier = nn.Linear(model.classifier.in_features, model.classifier.out_features)
    with torch.no_grad():
        classifier.weight.copy_(model.classifier.weight.float())
        bias = model.classifier.bias.double()
        if head_affine is not None:  # centring only: mean pooling and the linear classifier take the -m
            bias = bias - model.classifier.weight.double() @ head_affine.mean.double()
        classifier.bias.copy_(bias)
    return InferenceEfficientNet(stem, blocks, head, classifier.requires_grad_(False)).eval()
