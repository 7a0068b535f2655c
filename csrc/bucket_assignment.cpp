// Deterministic gradient-to-bucket assignment. Pure metadata, so one implementation serves every device.
#include <torch/library.h>

#include <map>
#include <vector>

namespace pyparallel {

// Note [Bucket assignment]
// Tensors are walked in reverse registration order, because backward produces the gradients of the last
// layers first. Each group key (one per (dtype, device) pair) has at most one open bucket; a tensor joins
// its group's open bucket, and the bucket closes as soon as it holds at least its size limit. The n-th
// bucket of a group gets size_limits[n] (the last limit repeats), so with the defaults [1 MiB, 25 MiB]
// the first bucket is small and its all-reduce starts early in backward. Buckets are numbered in the
// order they are opened. The result depends only on the metadata, so every rank computes the same one.
std::vector<int64_t> bucket_assignment(c10::IntArrayRef numels, c10::IntArrayRef element_sizes,
                                       c10::IntArrayRef group_keys, c10::IntArrayRef size_limits) {
  const char* op = "bucket_assignment";
  const size_t n = numels.size();
  TORCH_CHECK(element_sizes.size() == n && group_keys.size() == n, op, ": numels (", n, "), element_sizes (",
              element_sizes.size(), ") and group_keys (", group_keys.size(), ") must have the same length");
  TORCH_CHECK(!size_limits.empty(), op, ": size_limits must not be empty");
  for (int64_t limit : size_limits) {
    TORCH_CHECK(limit > 0, op, ": size limits must be positive (bytes), got ", limit);
  }
  struct Open {
    int64_t bucket = -1;
    int64_t bytes = 0;
    int64_t limit = 0;
    size_t opened = 0;  // buckets this group has opened so far
  };
  std::map<int64_t, Open> groups;
  std::vector<int64_t> bucket_of(n, -1);
  int64_t next_bucket = 0;
  for (size_t j = 0; j < n; ++j) {
    const size_t i = n - 1 - j;
    TORCH_CHECK(numels[i] >= 0 && element_sizes[i] > 0, op, ": tensor ", i, " has numel ", numels[i],
                " and element size ", element_sizes[i]);
    Open& g = groups[group_keys[i]];
    if (g.bucket < 0) {
      g.bucket = next_bucket++;
      g.bytes = 0;
      g.limit = size_limits[std::min(g.opened, size_limits.size() - 1)];
      ++g.opened;
    }
    bucket_of[i] = g.bucket;
    g.bytes += numels[i] * element_sizes[i];
    if (g.bytes >= g.limit) g.bucket = -1;
  }
  return bucket_of;
}

}  // namespace pyparallel

TORCH_LIBRARY_IMPL(pyparallel, CompositeImplicitAutograd, m) {
  m.impl("bucket_assignment", &pyparallel::bucket_assignment);
}
