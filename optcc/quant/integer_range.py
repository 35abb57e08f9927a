"""The range of the int8 weights optcc writes for onnxruntime's integer kernels.

On x86 CPUs without VNNI (AVX2, AVX-512F), onnxruntime multiplies uint8 activations by
int8 weights with ``vpmaddubsw``, which adds each two adjacent products into an int16
that saturates: with weights up to 127, ``a0*w0 + a1*w1`` reaches ``2 * 255 * 127 =
64770`` and is clipped at 32767, so the same model computes other numbers there than on a
VNNI or ARM CPU (int8 activations are shifted to uint8 first: the same bound). Weights
within ``+-WEIGHT_QMAX`` keep every pair within ``2 * 255 * 64 = 32640``: no sum
saturates, every CPU accumulates the same exact int32 values, and the model judged here
is the model every user runs. The price is one bit of weight resolution.
"""

WEIGHT_QMAX = 64  # the largest |int8 weight| written: no uint8 x int8 pair sum exceeds int16

__all__ = ["WEIGHT_QMAX"]
