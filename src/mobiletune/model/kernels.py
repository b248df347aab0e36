"""Phase 2's trainee computes the same layers with fewer, faster kernels.

Two rewrites, each exact up to float rounding (~1e-6), measured in benchmarks/phase2.py:
- A frozen BatchNorm (inference mode: `x * a + b`, per channel) is folded into the convolution
  before it: `conv(x, W) * a + b == conv(x, W * a) + b`. The scaling of the activations, and of
  their gradient, becomes a scaling of the small kernel.
- A 1x1 convolution with stride 1 is a matrix product of [pixels, channels] by [channels,
  filters]. TensorFlow runs `Conv2D` on oneDNN's convolution kernels and `MatMul` on oneDNN's
  GEMM: on MobileNetV2's 10x10 and 5x5 maps, forward plus both gradients, 1.11-1.39x as fast on
  AVX-512 and 1.13-1.35x with oneDNN held to AVX2. Together a phase-2 epoch is 1.13x as fast.

Only the trainee (`cut.top_model`) is rewritten; it holds the base's own variables (and a head
that `trainees` copies to the classifier's), so training it trains the classifier, and the saved
model stays a plain Keras MobileNetV2.
"""

from __future__ import annotations

import keras

from mobiletune.model import network as model_lib

__all__ = ["FoldedConv", "fast_clone"]


def is_pointwise(layer: keras.layers.Layer) -> bool:
    """A Conv2D that is a matrix product over channels: 1x1, stride 1, one group, no activation."""
    return (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last" and layer.activation is keras.activations.linear)


def is_depthwise(layer: keras.layers.Layer) -> bool:
    return (type(layer) is keras.layers.DepthwiseConv2D and layer.data_format == "channels_last"
            and layer.activation is keras.activations.linear)


def _frozen_bn_after(conv: keras.layers.Layer, readers: dict[int, list]) -> keras.layers.BatchNormalization | None:
    """The BatchNormalization that alone reads `conv`'s output (`readers`: id(tensor) -> the model's layers
    that read it), if it is frozen (always inference)."""
    bn = readers[id(conv.output)][0] if len(readers.get(id(conv.output), [])) == 1 else None
    if isinstance(bn, keras.layers.BatchNormalization) and not bn.trainable and bn.axis in (-1, 3):
        return bn
    return None


class FoldedConv(keras.layers.Layer):
    """`conv` (pointwise or depthwise), then the frozen `bn` if given, as one kernel call: `conv`'s
    own kernel trained in place (tracked, so it follows `conv.trainable`)."""

    def __init__(self, conv: keras.layers.Layer, bn: keras.layers.BatchNormalization | None, **kwargs):
        assert is_pointwise(conv) or is_depthwise(conv), conv.name
        super().__init__(name=f"{conv.name}_fast", **kwargs)
        self.conv, self.bn = conv, bn

    def _scale_shift(self):
        ops, bn = keras.ops, self.bn
        if bn is None:
            return None, self.conv.bias if self.conv.use_bias else None
        scale = ops.rsqrt(bn.moving_variance + bn.epsilon)
        if bn.scale:
            scale = scale * bn.gamma
        shift = -bn.moving_mean * scale + (bn.beta if bn.center else 0.0)
        if self.conv.use_bias:
            shift = shift + self.conv.bias * scale
        return scale, shift

    def call(self, x):
        ops, conv = keras.ops, self.conv
        scale, shift = self._scale_shift()
        if is_pointwise(conv):
            kernel = ops.squeeze(conv.kernel, (0, 1))
            kernel = kernel if scale is None else kernel * scale
            height, width, channels = x.shape[1:]
            y = ops.reshape(ops.matmul(ops.reshape(x, (-1, channels)), kernel), (-1, height, width, conv.filters))
        else:
            kernel = conv.kernel if scale is None else conv.kernel * ops.reshape(scale, conv.kernel.shape[2:])
            y = ops.depthwise_conv(x, kernel, strides=conv.strides, padding=conv.padding,
                                   data_format=conv.data_format, dilation_rate=conv.dilation_rate)
        return y if shift is None else y + shift

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


class _Folded(keras.layers.Layer):
    """Where a BatchNorm was: its work is done by the FoldedConv before it (called as the BN was)."""

    def call(self, x, training=None, mask=None):
        return x

    def compute_output_shape(self, input_shape):
        return input_shape


def fast_clone(model: keras.Model) -> keras.Model:
    """`model` (functional) with its pointwise and depthwise convolutions as `FoldedConv` (taking in
    the frozen BatchNorm after each); every other layer is the model's own."""
    readers: dict[int, list] = {}
    for layer in model.layers:
        for key in {id(t) for t in model_lib.inputs_of(layer)}:
            readers.setdefault(key, []).append(layer)
    folded = {}
    for layer in model.layers:
        if is_pointwise(layer) or is_depthwise(layer):
            folded[id(layer)] = _frozen_bn_after(layer, readers)
    absorbed = {id(bn) for bn in folded.values() if bn is not None}

    def clone(layer):
        if id(layer) in folded:
            return FoldedConv(layer, folded[id(layer)])
        if id(layer) in absorbed:
            return _Folded(name=f"{layer.name}_folded")
        return layer

    return keras.models.clone_model(model, clone_function=clone)
