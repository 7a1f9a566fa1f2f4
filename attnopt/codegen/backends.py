"""Importing this module registers every compiled backend's kernels with the registry.

One import per backend module; each registers its kernels at import time and defers heavy
imports (the compiler itself) to the first call.
"""

import attnopt.codegen.sdpa  # noqa: F401
import attnopt.codegen.triton.decode  # noqa: F401
import attnopt.codegen.triton.exact  # noqa: F401
import attnopt.codegen.triton.linear  # noqa: F401
import attnopt.codegen.triton.quant  # noqa: F401
import attnopt.codegen.triton.tensor  # noqa: F401
import attnopt.codegen.tvm.decode  # noqa: F401
import attnopt.codegen.tvm.exact  # noqa: F401
import attnopt.codegen.tvm.linear  # noqa: F401
import attnopt.codegen.tvm.quant  # noqa: F401
