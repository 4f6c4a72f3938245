"""Fast Attentive Normalization: the AN forward as functions of tensors, one autograd node, no full-size
temporaries, BN-sized saves. The layer (:mod:`an_zoo.layers.attentive_norm`) decides when this path is used.

The reference layer runs BatchNorm (a pass over x, and it saves x), computes the attention statistic (another pass)
and then ``xhat * gamma + beta`` (two more passes, and autograd saves ``xhat``, a second full-size tensor); in eager
mode it also records about fifteen autograd nodes per layer, whose bookkeeping dominates on small feature maps. Here:

* :func:`~an_zoo.layers.statistics.instance_moments` gives the per-(sample, channel) mean and biased variance
  (float32, also under autocast): on CPU from BatchNorm's own statistics kernel (two reads, no writes) where that
  pays, otherwise from sums of shifted values. The batch statistics follow exactly from them (law of total
  variance), and so does the attention input.
* The rest of the forward is (N, C) / (N, K) arithmetic, folded into one scale ``a`` and shift ``b`` per (sample,
  channel): ``out = x * a + b``, written in one pass.
* :class:`AttentiveNormFunction` is that whole forward as a single ``torch.autograd.Function`` with an analytic
  backward (derived in its docstring): two reductions over the incoming gradient (on CPU through BatchNorm's backward
  kernel where that pays), the input gradient in two elementwise passes, and small matrix algebra for every
  parameter gradient (BatchNorm_K forward and backward as one ``native_batch_norm`` op each). It saves x (the same
  storage BatchNorm saves) and only (N, C) / (N, K) vectors. Without autograd the same forward runs without the
  Function; in eval mode (:func:`_inference`) it is the fewest small ops.
* The only full-size tensors allocated are the output (forward) and the input gradient (backward), as for
  BatchNorm: the shifted values and squares of the sums, and the products ``dy * x``, are written into those
  buffers before their final contents. (On CPU a fresh large allocation comes from the OS page by page; writing
  into a buffer that is written anyway is measurably cheaper than a separate scratch tensor.)

The running statistics are updated outside the Function (it has no side effects, as torch.compile wants), from the
batch statistics it returns. The backward is checked against the reference layer and with
``torch.autograd.gradcheck`` in float64 (tests/test_fast_norm.py). No hand-written kernel is used: on CUDA these are
plain PyTorch ops (compiled ones under torch.compile).
"""
import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .statistics import (_cast, batchnorm_kernel_grad_sums, instance_moments, stats_input, update_running_stats_many,
                         use_batchnorm_backward_kernels, uses_batch_stats)

__all__ = ['AttentiveNormFunction', 'instance_moments', 'fast_attentive_norm', 'fast_path_supported', 'stats_input']


def _nc11(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _cast(t, dtype).view(*t.shape, 1, 1)


def _channel_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """``out = x * a + b`` per (sample, channel), written into ``out``; ``b = beta - mean * a`` with ``mean`` (C,)
    the mean x is standardized with (batch mean in training, running mean in eval).

    float16 / bfloat16 x is centred on that mean first, ``(x - m) * a + (b + m a)`` with ``m`` = mean rounded to x's
    dtype (b absorbs exactly that value), i.e. ``gamma * xhat + beta`` as the reference computes it. Otherwise
    ``x * a`` and ``b`` nearly cancel when |mean| >> std and the low-precision result loses log2(|mean| / std) bits
    (a constant channel all of them). float32 / float64 keep the single pass (their cancellation error is ~1e-6).
    """
    if x.dtype in (torch.float32, torch.float64):
        return torch.addcmul(_nc11(b, x.dtype), x, _nc11(a, x.dtype), out=out)
    centre = mean.to(x.dtype)
    b = torch.addcmul(b, a, centre.to(b.dtype))
    torch.sub(x, centre.view(1, -1, 1, 1), out=out)
    return torch.addcmul(_nc11(b, x.dtype), out, _nc11(a, x.dtype), out=out)


def _no_autocast(device_type: str):
    """The (N, C) / (N, K) algebra runs in float32 even under autocast (autocast would recast its matmuls)."""
    if device_type == 'meta':  # shape-only tensors: no autocast exists there (and torch refuses to be asked)
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


def _forward(
        x: torch.Tensor, conv_weight: torch.Tensor, attn_weight: torch.Tensor, attn_bias: torch.Tensor,
        mixture_weight: torch.Tensor, mixture_bias: torch.Tensor,
        norm_mean: Optional[torch.Tensor], norm_var: Optional[torch.Tensor],
        attn_mean: Optional[torch.Tensor], attn_var: Optional[torch.Tensor],
        eps: float, attn_eps: float, attn_bn_eps: float,
) -> Tuple[torch.Tensor, List[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """``(out, [batch mean, unbiased batch var, attention-logit mean, unbiased attention-logit var], saved)``.

    ``norm_mean`` / ``attn_mean`` None: batch statistics (training), else those running statistics. The batch
    statistics are returned empty where running ones are used; ``saved`` is what the backward needs. Every small op is
    a dispatch whose cost on small feature maps is that of a data pass, so the (N, C) / (N, K) work is kept to the
    fewest ops: in-place updates, and BatchNorm_K as one ``native_batch_norm`` (its backward is one op too).
    """
    n, _, h, w = x.shape
    spatial = h * w
    dt = _compute_dtype(x, mixture_weight)
    # the output buffer may first take the shifted values of the statistics pass (no extra full-size allocation)
    out = torch.empty_like(x)
    mu, var_nc = _instance_moments(x, out, dt)
    if norm_mean is None:  # law of total variance: batch var = mean of instance vars + var of instance means
        mean = mu.mean(0)
        centered = mu - mean  # (torch.var_mean over dim 0 of an (N, C) matrix is a slow Welford loop on CPU)
        var = torch.addcmul(var_nc, centered, centered).mean(0)
        count = n * spatial
        batch_stats = [mean, var * (count / max(count - 1, 1))]
    else:
        mean, var = _cast(norm_mean, dt), _cast(norm_var, dt)
        batch_stats = [x.new_empty(0, dtype=dt), x.new_empty(0, dtype=dt)]
    rstd = torch.rsqrt(var + eps)
    # attention input mu * rsqrt(unbiased var + eps); a single position has var 0 (see the reference layer)
    unbias = spatial / (spatial - 1) if spatial > 1 else 0.0
    q = var_nc.mul_(unbias).add_(attn_eps).rsqrt_()
    z = torch.mm(mu * q, _cast(conv_weight, dt).view(conv_weight.shape[0], -1).t())  # the 1x1 conv on (N, C, 1, 1)
    attn_running = (None, None) if attn_mean is None else (_cast(attn_mean, dt), _cast(attn_var, dt))
    u, z_mean, z_invstd = torch.native_batch_norm(z, _cast(attn_weight, dt), _cast(attn_bias, dt), *attn_running,
                                                  attn_mean is None, 0.0, attn_bn_eps)
    if attn_mean is None:
        batch_stats += [z_mean, z.var(0)]
    else:
        batch_stats += [x.new_empty(0, dtype=dt), x.new_empty(0, dtype=dt)]
    lam = F.hardsigmoid(u)
    a = torch.mm(lam, _cast(mixture_weight, dt)).mul_(rstd)  # gamma * rstd
    b = torch.mm(lam, _cast(mixture_bias, dt)).addcmul_(a, mean, value=-1)  # beta - mean * gamma * rstd
    _channel_affine(x, a, b, mean, out)
    # s = mu q and a are recomputed in backward (three ops): keeping them measured no faster, and the saved
    # activations of networks with many thin AN layers grew by up to 0.8 % of BatchNorm's (ResNet-50 an_all)
    return out, batch_stats, (mean, rstd, mu, q, z, u, lam, z_mean, z_invstd, *attn_running)


def _instance_moments(x: torch.Tensor, scratch: torch.Tensor, dtype: torch.dtype
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`instance_moments` of x in ``dtype``; ``scratch`` (x's buffer for the output) is used only by the shifted
    sums of a float32 / float64 x."""
    mu, var = instance_moments(x, scratch if x.dtype in (torch.float32, torch.float64) else None)
    return _cast(mu, dtype), _cast(var, dtype)


def _gradient_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, scratch: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sum_hw dy`` and ``sum_hw dy (x - m)`` per (sample, channel), in ``mean``'s dtype (m: per channel).

    Through BatchNorm's backward kernel where :func:`use_batchnorm_backward_kernels` holds (no writes); otherwise
    ``scratch`` (like x) takes the products ``dy * x``: the layer passes the buffer its input gradient is written to
    next, so no extra full-size tensor is allocated.
    """
    if mean.dtype == x.dtype and use_batchnorm_backward_kernels(x, grad):
        return batchnorm_kernel_grad_sums(grad, x, mean)
    d_sum = grad.sum(dim=(2, 3), dtype=mean.dtype)
    d_product = torch.mul(grad, x, out=scratch).sum(dim=(2, 3), dtype=mean.dtype)
    return d_sum, d_product.addcmul_(d_sum, mean, value=-1)


def _inference(
        x: torch.Tensor, conv_weight: torch.Tensor, attn_weight: torch.Tensor, attn_bias: torch.Tensor,
        mixture_weight: torch.Tensor, mixture_bias: torch.Tensor, norm_mean: torch.Tensor, norm_var: torch.Tensor,
        attn_mean: torch.Tensor, attn_var: torch.Tensor, eps: float, attn_eps: float, attn_bn_eps: float,
) -> torch.Tensor:
    """:func:`_forward` without autograd and with running statistics for both BatchNorms (inference), in the fewest
    ops: every small op is a dispatch (and often an allocation) whose cost on a small feature map is that of the
    data passes, so in eager mode nothing is folded per call and no (K, C) temporary is made: BatchNorm_K is one
    ``batch_norm`` call on the (N, K) logits. Compiled and exported graphs fold it into the 1x1 conv instead, a
    computation on parameters alone that compilers and runtimes fold once (ONNX Runtime then fuses the conv, its
    bias and the hardsigmoid into one Gemm).
    """
    n, c, h, w = x.shape
    spatial = h * w
    dt = _compute_dtype(x, mixture_weight)
    out = torch.empty_like(x)
    mu, var_nc = _instance_moments(x, out, dt)
    if spatial > 1:  # mu * rsqrt(var_nc M / (M - 1) + e_a), the factor sqrt((M - 1) / M) moved to the K logits
        s = var_nc.add_(attn_eps * (spatial - 1) / spatial).rsqrt_().mul_(mu)
        logit_scale = ((spatial - 1) / spatial) ** 0.5
    else:  # a single position has variance 0 (see the reference layer): s = mu * rsqrt(e_a)
        s = mu
        logit_scale = attn_eps ** -0.5
    conv = _cast(conv_weight, dt).view(conv_weight.shape[0], c)
    if torch.compiler.is_compiling():
        attn_scale = torch.rsqrt(_cast(attn_var, dt) + attn_bn_eps) * _cast(attn_weight, dt)
        attn_shift = _cast(attn_bias, dt) - _cast(attn_mean, dt) * attn_scale
        z = torch.addmm(attn_shift, s, (conv * (attn_scale * logit_scale)[:, None]).t())
    else:
        z = torch.batch_norm(torch.mm(s, conv.t()).mul_(logit_scale), _cast(attn_weight, dt), _cast(attn_bias, dt),
                             _cast(attn_mean, dt), _cast(attn_var, dt), False, 0.0, attn_bn_eps, False)
    lam = F.hardsigmoid(z, inplace=True)
    mean = _cast(norm_mean, dt)
    a = torch.mm(lam, _cast(mixture_weight, dt)).mul_(torch.rsqrt(_cast(norm_var, dt) + eps))  # gamma * rstd
    b = torch.mm(lam, _cast(mixture_bias, dt)).addcmul_(a, mean, value=-1)  # beta - mean * a
    return _channel_affine(x, a, b, mean, out)


class AttentiveNormFunction(torch.autograd.Function):
    """The whole AN forward ``out = x * a + b`` (see :func:`_forward`) as one autograd node.

    Inputs: ``x``, the attention's 1x1 conv weight (K, C, 1, 1), BatchNorm_K's weight and bias (K), the mixture
    weight and bias (K, C); running statistics of the standardization and of BatchNorm_K, or None for batch
    statistics; the three epsilons. Outputs: ``out`` and the (non-differentiable) batch statistics for the
    running-statistics update.

    Backward. Notation: M = H*W, per (n, c) mean ``mu`` and biased var ``v`` of x, ``q = rsqrt(v M/(M-1) + e_a)``,
    ``s = mu q``, ``z = s Wc^T``, ``zh = (z - mz) rz``, ``u = zh g + h``, ``lam = hsig(u)``, ``gamma = lam W``,
    ``beta = lam B``, channel mean ``m`` and ``r = rsqrt(var + eps)``, ``a = gamma r``, ``b = beta - m a``,
    ``out = x a + b``. With ``dy`` the incoming gradient:

        P = sum_hw dy,  Q = sum_hw dy x                          (the only two reductions over the big tensor)
        da = Q - m P  (through a, and through b = beta - m a),   dgamma = da r,   dbeta = P
        dW = lam^T dgamma,  dB = lam^T dbeta,  dlam = dgamma W^T + dbeta B^T
        du = dlam [-3 < u < 3] / 6,  dg = sum_n du zh,  dh = sum_n du,  dzh = du g
        dz = rz (dzh - mean_n dzh - zh mean_n(dzh zh))    (batch statistics; running ones: dz = rz dzh)
        dWc = dz^T s,  ds = dz Wc,  dmu = ds q,  dv = -ds s q^2 M / (2 (M-1))   (dv = 0 at M = 1)
      batch statistics of the standardization, m = mean_n mu, var = mean_n v + mean_n (mu - m)^2:
        dr = sum_n da gamma = sum_n da a / r,  dm = -sum_n P a,  dvar = -dr r^3 / 2
        dv += dvar / N,  dmu += (dm + 2 dvar (mu - m)) / N
      and from mu = sum_hw x / M, v = sum_hw (x - mu)^2 / M:
        dx = dy a + dmu / M + 2 dv (x - mu) / M = dy a + x p + c,   p = 2 dv / M,  c = dmu / M - p mu
      where, in c = (dmu - 2 mu dv) / M, the batch-statistics terms reduce to the per-channel (dm - 2 m dvar) / (N M).
    """

    @staticmethod
    def forward(ctx, x, conv_weight, attn_weight, attn_bias, mixture_weight, mixture_bias,
                norm_mean, norm_var, attn_mean, attn_var, eps, attn_eps, attn_bn_eps):
        with _no_autocast(x.device.type):
            out, batch_stats, saved = _forward(x, conv_weight, attn_weight, attn_bias, mixture_weight, mixture_bias,
                                               norm_mean, norm_var, attn_mean, attn_var, eps, attn_eps, attn_bn_eps)
        ctx.save_for_backward(x, conv_weight, attn_weight, mixture_weight, mixture_bias, *saved)
        ctx.norm_batch, ctx.attn_batch, ctx.attn_bn_eps = norm_mean is None, attn_mean is None, attn_bn_eps
        ctx.dtypes = (x.dtype, conv_weight.dtype, attn_weight.dtype, attn_bias.dtype, mixture_weight.dtype,
                      mixture_bias.dtype)
        ctx.mark_non_differentiable(*batch_stats)
        ctx.set_materialize_grads(False)  # no zero gradients made for the batch statistics (four ops per layer)
        return (out, *batch_stats)

    @staticmethod
    def backward(ctx, grad_out, *_):
        if grad_out is None:  # the output took no part in what is differentiated
            return (None,) * 13
        with _no_autocast(grad_out.device.type):
            return AttentiveNormFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        (x, conv_weight, attn_weight, mixture_weight, mixture_bias, mean, rstd, mu, q, z, u, lam, z_mean, z_invstd,
         attn_mean, attn_var) = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, _, h, w = x.shape
        spatial = h * w
        dt = mu.dtype
        weight, bias = _cast(mixture_weight, dt), _cast(mixture_bias, dt)
        s = mu * q  # as in the forward, bit for bit
        a = torch.mm(lam, weight).mul_(rstd)
        d_x = torch.empty_like(x)
        d_beta, d_a = _gradient_sums(grad_out, x, mean, d_x)  # P, Q - m P
        d_gamma = d_a * rstd
        lam_t = lam.t()
        d_mixture_weight = torch.mm(lam_t, d_gamma) if need[4] else None
        d_mixture_bias = torch.mm(lam_t, d_beta) if need[5] else None
        d_lam = torch.addmm(torch.mm(d_beta, bias.t()), d_gamma, weight.t())
        d_u = torch.ops.aten.hardsigmoid_backward(d_lam, u)
        d_z, d_attn_weight, d_attn_bias = torch.ops.aten.native_batch_norm_backward(
            d_u, z, _cast(attn_weight, dt), attn_mean, attn_var, z_mean, z_invstd, ctx.attn_batch, ctx.attn_bn_eps,
            [True, need[2], need[3]])
        d_conv_weight = torch.mm(d_z.t(), s).view(conv_weight.shape) if need[1] else None
        if not need[0]:
            d_x = None
        else:  # d_x = dy a + x p + c, p and c as in the class docstring, in the fewest (N, C) ops
            unbias = spatial / (spatial - 1) if spatial > 1 else 0.0
            conv = _cast(conv_weight, dt).view(conv_weight.shape[0], -1)
            d_mu = torch.addmm(mu, d_z, conv, beta=0, alpha=1.0 / spatial).mul_(q)  # d_mu / M via the attention
            t = torch.mul(d_mu, s).mul_(q)  # -2 (M - 1) dv / M^2 via the attention
            c = torch.addcmul(d_mu, mu, t, value=unbias)  # (d_mu - 2 mu dv) / M
            if ctx.norm_batch:  # the batch mean and variance add per-channel terms (dvar / N, dm / N)
                p_var = torch.linalg.vecdot(d_gamma, a, dim=0).mul_(rstd).mul_(-1.0 / (n * spatial))  # 2 dvar/(N M)
                c_mean = torch.linalg.vecdot(d_beta, a, dim=0).mul_(-1.0 / (n * spatial))  # dm / (N M)
                c = c.add_(c_mean.addcmul_(mean, p_var, value=-1))  # + (dm - 2 m dvar) / (N M)
                p = torch.add(p_var, t, alpha=-unbias)
            else:
                p = t.mul_(-unbias)
            torch.addcmul(_nc11(c, x.dtype), x, _nc11(p, x.dtype), out=d_x).addcmul_(grad_out, _nc11(a, x.dtype))
        grads = (d_x, d_conv_weight, d_attn_weight, d_attn_bias, d_mixture_weight, d_mixture_bias)
        grads = tuple(g if g is None else _cast(g, dtype) for g, dtype in zip(grads, ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


def fast_path_supported(norm: nn.Module, attn_bn: nn.Module) -> bool:
    """Whether :func:`fast_attentive_norm` can stand in for these two BatchNorms: batch statistics need a plain
    ``nn.BatchNorm2d`` (a SyncBatchNorm must all-reduce them), running statistics (eval, frozen) can come from any
    BatchNorm-like module; the attention's BatchNorm must be affine."""
    return ((type(norm) is nn.BatchNorm2d or not uses_batch_stats(norm))
            and (type(attn_bn) is nn.BatchNorm2d or not uses_batch_stats(attn_bn))
            and attn_bn.weight is not None)


def fast_attentive_norm(x: torch.Tensor, norm: nn.Module, attn_bn: nn.Module, conv_weight: torch.Tensor,
                        mixture_weight: torch.Tensor, mixture_bias: torch.Tensor, attn_eps: float) -> torch.Tensor:
    """The AN forward computed the fast way, with the running-statistics updates of ``norm`` (the standardization)
    and ``attn_bn`` (BatchNorm_K) that their own forwards would make.

    ``conv_weight`` is the attention's 1x1 conv weight (K, C, 1, 1), ``mixture_weight`` / ``mixture_bias`` the K affine
    transforms (K, C), ``attn_eps`` the epsilon of the attention statistic. The caller checks
    :func:`fast_path_supported` first (the layer runs its reference code otherwise).
    """
    norm_batch, attn_batch = uses_batch_stats(norm), uses_batch_stats(attn_bn)
    args = (x, conv_weight, attn_bn.weight, attn_bn.bias, mixture_weight, mixture_bias,
            None if norm_batch else norm.running_mean, None if norm_batch else norm.running_var,
            None if attn_batch else attn_bn.running_mean, None if attn_batch else attn_bn.running_var,
            norm.eps, attn_eps, attn_bn.eps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:6]):
        out, mean, var, z_mean, z_var = AttentiveNormFunction.apply(*args)
    else:  # no autograd: the same forward without the Function's bookkeeping
        with _no_autocast(x.device.type):
            if not (norm_batch or attn_batch):
                return _inference(*args)
            out, (mean, var, z_mean, z_var), _ = _forward(*args)
    # (a BatchNorm with running statistics from which no batch ones were computed is in eval mode: not updated)
    update_running_stats_many(((norm, mean, var), (attn_bn, z_mean, z_var)))
    return out
