// Constants and the shared-tile layout common to both decode kernels (decode.cuh: 16/32-row
// tiles on mma.sync; decode_wgmma.cuh: 64-row tiles on wgmma).
#pragma once
#include "params.cuh"

namespace flashmla {

constexpr int kBlockN = 64;         // KV tokens per main-loop block
constexpr float kMaxInit = -1e30f;  // finite: exp2 of (init - init) is 1, never NaN

// Shared tiles are stored as wgmma's 128-byte-swizzled K-major layout: a tile of kRows
// rows x (64 * n) columns is n sub-tiles of kRows x 64 elements (128-byte rows, 8-row
// atoms of 1024 bytes), and inside a row the 16-byte chunk index is XORed with row % 8.
// wgmma reads it through descriptors; ldmatrix reads 8 rows of one chunk column from 8
// different bank groups. Element offset of (row, col); col must be a multiple of 8.
template <int kRows>
__device__ __forceinline__ int tile_offset(int row, int col) {
  return (col / 64) * kRows * 64 + row * 64 + ((((col / 8) % 8) ^ (row % 8)) * 8);
}
constexpr int kSubTileBytes = kBlockN * 128;  // one 64-column sub-tile of a KV block

}  // namespace flashmla
