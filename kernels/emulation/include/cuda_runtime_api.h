// Emulation build only: stands in for the CUDA toolkit's <cuda_runtime_api.h> (kernels/emulation/README.md).
#pragma once
#include "progan_emu/cuda.h"
