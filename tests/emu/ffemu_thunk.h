// Included at the end of every generated kernel wrapper (build/emu.rs), in the same translation
// unit as the kernels: turns a cuLaunchKernel-style argument array (args[i] points at the value of
// parameter i) into a call. Template deduction on the kernel's own type does the unpacking, so the
// build script only needs the kernels' names.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include "ffemu_abi.h"

namespace ffemu {

template <typename... A>
constexpr unsigned arity(void (*)(A...)) {
    return sizeof...(A);
}

template <typename... A, std::size_t... I>
inline void invoke_kernel(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    (void)args;
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <auto Kernel>
void thunk(void** args) {
    invoke_kernel(Kernel, args, std::make_index_sequence<arity(Kernel)>{});
}

}  // namespace ffemu
