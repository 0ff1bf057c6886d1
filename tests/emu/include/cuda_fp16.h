// Stub for emulated builds: everything this header would declare comes from the force-included
// cuda_emu.h, so `#include <cuda_fp16.h>` in kernel source compiles unchanged under g++.
#pragma once
#include <stdint.h>
