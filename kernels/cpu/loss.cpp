// CPU softmax cross-entropy over logits [n, k] (k = numel/n) with int32 labels [n]: forward writes the
// probabilities and per-sample losses -log p[label] (max-subtracted, log-sum-exp in double); backward
// writes dlogits = scale*(probs - onehot). Labels are checked before anything is written.
#include <cmath>

#include "kernels/cpu/cpu_parallel.h"
#include "kernels/ops.h"

namespace pipar::kernels::cpu {
namespace {

void check_labels(const char* op, ConstIndexView labels, int64_t n, int64_t k) {
  for (int64_t i = 0; i < n; ++i)
    if (labels.data[i] < 0 || labels.data[i] >= k)
      throw Error(detail::concat(op, ": label ", labels.data[i], " of sample ", i, " is outside [0, ", k,
                                 ") (k = ", k, " classes)"));
}

}  // namespace

void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses) {
  const int64_t n = logits.shape.n, k = logits.numel() / n;
  check_labels("softmax_cross_entropy_forward", labels, n, k);
  par::parallel_items(n, 4 * k, [&](int64_t i) {
    const float* l = logits.data + i * k;
    float* pr = probs.data + i * k;
    float mx = l[0];
    for (int64_t j = 1; j < k; ++j) mx = l[j] > mx ? l[j] : mx;
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const float e = std::exp(l[j] - mx);
      pr[j] = e;
      sum += e;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t j = 0; j < k; ++j) pr[j] *= inv;
    // -log p[label] = log(sum) - (l[label] - max), exact even where p[label] underflows to 0.
    losses.data[i] = static_cast<float>(std::log(sum) - (static_cast<double>(l[labels.data[i]]) - mx));
  });
}

void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits) {
  const int64_t n = probs.shape.n, k = probs.numel() / n;
  check_labels("softmax_cross_entropy_backward", labels, n, k);
  par::parallel_items(n, k, [&](int64_t i) {
    const float* pr = probs.data + i * k;
    float* d = dlogits.data + i * k;
    const int32_t label = labels.data[i];
    const float p_label = pr[label];  // read first: dlogits may alias probs
    for (int64_t j = 0; j < k; ++j) d[j] = scale * pr[j];
    d[label] = scale * (p_label - 1.0f);
  });
}

}  // namespace pipar::kernels::cpu
