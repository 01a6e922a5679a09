"""The compiled part of onnx_split: the CPU kernel of ``onnx_split.DynamicBlockMatMul`` for ONNX
Runtime (onnx_split/kernels/dynamic_block_matmul.c), built as a plain shared library next to the
package. It is optional: where it cannot be built (no C compiler, not Linux/x86-64 gcc-compatible),
``pip install`` still succeeds and ``onnx_split.kernel_library()`` says why it is absent.

No -march=native: the library runs on any x86-64 and picks its AVX2/FMA path at run time.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class PlainLibrary(build_ext):
    """Build the kernel as a shared library that ONNX Runtime dlopens (it is never imported by
    Python, so it exports RegisterCustomOps, not a PyInit_ function)."""

    def get_export_symbols(self, ext):
        return ["RegisterCustomOps", "onnx_split_dynamic_kernel_path", "onnx_split_dynamic_kernel_force_plain"]

    def get_ext_filename(self, fullname):
        return fullname.replace(".", "/") + ".so"

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # optional: the pure Python package works without it
            self.warn(f"onnx_split: the DynamicBlockMatMul kernel was not built ({exc}); "
                      f"the dynamic kernel form is unavailable, the portable form still works")


KERNEL = Extension(
    "onnx_split.kernels._dynamic_block_matmul",
    sources=["onnx_split/kernels/dynamic_block_matmul.c"],
    extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden", "-D_GNU_SOURCE"],
    extra_link_args=["-lm", "-lpthread"],
    optional=True,
)

setup(ext_modules=[KERNEL], cmdclass={"build_ext": PlainLibrary})
