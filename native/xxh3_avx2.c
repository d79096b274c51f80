/* XXH3-128 for CPUs with AVX2. */
#pragma GCC target("avx2")
#define BF_XXH3_FN bf_xxh3_128_avx2
#include "xxh3_impl.h"
