// Stub for emulated builds: everything this header would declare comes from the force-included
// cuda_emu.h, so `#include <cuda_runtime_api.h>` in kernel source compiles unchanged under g++.
#pragma once
#include <stdint.h>
