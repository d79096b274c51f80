/* XXH3-128 for CPUs with AVX-512F. */
#pragma GCC target("avx512f")
#define BF_XXH3_FN bf_xxh3_128_avx512
#include "xxh3_impl.h"
