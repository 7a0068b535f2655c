// The copy plan shared by the CPU and CUDA bucket copies: which byte ranges move where.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pyparallel {

struct CopyPiece {
  const char* src;
  char* dst;
  int64_t bytes;
};

// Cuts each contiguous tensor into pieces of at most `piece_bytes` laid end to end in `flat` (1-D).
// Non-contiguous tensors (rare for gradients) are copied right here with ATen's strided copy.
// to_flat: tensors -> flat; otherwise flat -> tensors.
inline std::vector<CopyPiece> plan_bucket_copy(at::TensorList tensors, const at::Tensor& flat, bool to_flat,
                                               int64_t piece_bytes) {
  const int64_t esize = flat.element_size();
  char* base = static_cast<char*>(flat.data_ptr());
  std::vector<CopyPiece> pieces;
  int64_t offset = 0;  // elements
  for (const at::Tensor& t : tensors) {
    const int64_t n = t.numel();
    if (n > 0 && t.is_contiguous()) {
      char* f = base + offset * esize;
      char* p = static_cast<char*>(t.data_ptr());
      if (f != p) {  // a tensor that already is a view of its slot needs no copy
        for (int64_t b = 0; b < n * esize; b += piece_bytes) {
          const int64_t bytes = std::min(piece_bytes, n * esize - b);
          pieces.push_back(to_flat ? CopyPiece{p + b, f + b, bytes} : CopyPiece{f + b, p + b, bytes});
        }
      }
    } else if (n > 0) {
      at::Tensor slot = flat.narrow(0, offset, n).view(t.sizes());
      if (to_flat) {
        slot.copy_(t);
      } else {
        const_cast<at::Tensor&>(t).copy_(slot);
      }
    }
    offset += n;
  }
  return pieces;
}

}  // namespace pyparallel
