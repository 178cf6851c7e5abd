// Cross-device batching on the CPU (runtime/lanes.h): a group of replicas' micro-batches trained side
// by side gives each replica exactly what training it alone on the lane's thread count gives, bit for
// bit: activation gradients, losses, accumulated parameter gradients and the weights after steps.
#include <gtest/gtest.h>

#include <memory>

#include "kernels/parallel.h"
#include "runtime/lanes.h"
#include "tests/random.h"

namespace pipar {
namespace {

struct Replica {
  std::unique_ptr<Model> model;
  std::unique_ptr<ServerPart> part;
};

// A replica of `name` cut at `split`, with its own fresh random weights (seed), small width.
Replica make_replica(const std::string& name, size_t split, uint64_t seed) {
  ModelOptions o;
  o.width = 0.25f;
  o.seed = seed;
  Replica r;
  r.model = build_model(name, o);
  kernels::SgdParams sgd;
  sgd.lr = 0.05f, sgd.momentum = 0.9f, sgd.weight_decay = 1e-3f;
  r.part = std::make_unique<ServerPart>(*r.model, split, sgd);
  return r;
}

struct Micro {
  Tensor x, y;
  int64_t batch = 0;
};

Micro random_micro(test::Rng& rng, const Model& m, size_t split, int64_t n) {
  Shape4 cut = m.block_out_shape(split - 1);
  cut.n = n;
  std::vector<int32_t> ys(static_cast<size_t>(n));
  for (auto& y : ys) y = rng.integer(0, 9);
  return {Tensor::from_vector(rng.uniform_vec(static_cast<size_t>(cut.numel())), cut),
          Tensor::from_vector(ys, {n, 1, 1, 1}), 3 * n + 1};
}

void expect_bitwise(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  const std::vector<float> va = a.to_vector(), vb = b.to_vector();
  size_t differ = 0;
  for (size_t i = 0; i < va.size(); ++i) differ += va[i] != vb[i];
  EXPECT_EQ(differ, 0u) << what << ": " << differ << " of " << va.size() << " values differ";
}

// K replicas, each with fresh weights, two groups of odd-sized micro-batches and a step after each;
// against K twins (the same seeds) trained one at a time on the lane's thread count.
void check_group_equals_alone(const std::string& name, size_t split, int lanes, int lane_threads) {
  SCOPED_TRACE(test::seed_trace());
  SCOPED_TRACE(name + " split " + std::to_string(split) + ", " + std::to_string(lanes) + " lanes of " +
               std::to_string(lane_threads) + " threads");
  test::Rng rng(split * 131 + static_cast<uint64_t>(lanes));
  const int k = 5;
  std::vector<Replica> grouped, alone;
  for (int i = 0; i < k; ++i) {
    const uint64_t seed = 1000 + static_cast<uint64_t>(rng.integer(0, 1 << 20));
    grouped.push_back(make_replica(name, split, seed));
    alone.push_back(make_replica(name, split, seed));
  }
  ServerLanes pool(lanes, lane_threads);
  const int64_t sizes[2][5] = {{3, 7, 1, 5, 9}, {6, 2, 11, 4, 1}};
  for (int round = 0; round < 2; ++round) {
    std::vector<ServerLanes::Item> items;
    std::vector<Micro> micros;
    for (int i = 0; i < k; ++i) micros.push_back(random_micro(rng, *grouped[i].model, split, sizes[round][i]));
    for (int i = k - 1; i >= 0; --i) {  // not in replica order: order within a group must not matter
      ServerLanes::Item it;
      it.part = grouped[i].part.get();
      it.activation = micros[i].x, it.labels = micros[i].y, it.batch_size = micros[i].batch;
      items.push_back(std::move(it));
    }
    pool.train(items);
    kernels::ScopedThreads same(lane_threads);
    for (int i = 0; i < k; ++i) {
      const ServerLanes::Item& it = items[static_cast<size_t>(k - 1 - i)];
      ASSERT_FALSE(it.error) << "replica " << i;
      ServerPart::Result want = alone[i].part->train_micro(micros[i].x, micros[i].y, micros[i].batch);
      expect_bitwise(it.result.grad, want.grad, "activation gradient of replica " + std::to_string(i));
      EXPECT_EQ(it.result.stats.loss_sum, want.stats.loss_sum);
      EXPECT_EQ(it.result.stats.correct, want.stats.correct);
      EXPECT_EQ(it.result.stats.count, sizes[round][i]);
      const std::vector<Param*> pg = grouped[i].model->params(split), pa = alone[i].model->params(split);
      for (size_t j = 0; j < pg.size(); ++j) expect_bitwise(pg[j]->grad, pa[j]->grad, "gradient of " + pg[j]->name);
      grouped[i].part->step();
      alone[i].part->step();
    }
  }
  for (int i = 0; i < k; ++i) {
    const std::vector<Param*> pg = grouped[i].model->params(split), pa = alone[i].model->params(split);
    for (size_t j = 0; j < pg.size(); ++j) expect_bitwise(pg[j]->value, pa[j]->value, "weights of " + pg[j]->name);
  }
}

TEST(ServerLanes, GroupEqualsEachReplicaAloneVgg5) { check_group_equals_alone("vgg5", 2, 3, 1); }
TEST(ServerLanes, GroupEqualsEachReplicaAloneVgg5TwoThreadsPerLane) { check_group_equals_alone("vgg5", 1, 2, 2); }
TEST(ServerLanes, GroupEqualsEachReplicaAloneResnet18) { check_group_equals_alone("resnet18", 3, 2, 1); }
TEST(ServerLanes, GroupEqualsEachReplicaAloneMobilenet) { check_group_equals_alone("mobilenetv3-small", 4, 4, 1); }
TEST(ServerLanes, OneLaneEqualsEachReplicaAlone) { check_group_equals_alone("vgg5", 3, 1, 2); }

TEST(ServerLanes, RefusesTwoMicroBatchesOfOneReplica) {
  test::Rng rng(7);
  Replica r = make_replica("vgg5", 2, 3);
  ServerLanes pool(2, 1);
  std::vector<ServerLanes::Item> items(2);
  for (auto& it : items) {
    Micro m = random_micro(rng, *r.model, 2, 4);
    it.part = r.part.get(), it.activation = m.x, it.labels = m.y, it.batch_size = m.batch;
  }
  try {
    pool.train(items);
    FAIL() << "a group with one replica twice was trained";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("distinct"), std::string::npos) << e.what();
  }
  for (const auto& it : items) EXPECT_FALSE(it.result.grad.defined());  // nothing ran
}

// One item's failure (a label out of range) is that item's: the others train, and the pool serves the
// next group.
TEST(ServerLanes, AFailingItemLeavesTheOthers) {
  test::Rng rng(9);
  std::vector<Replica> reps;
  for (uint64_t s = 1; s <= 3; ++s) reps.push_back(make_replica("vgg5", 2, s));
  ServerLanes pool(2, 1);
  for (int group = 0; group < 2; ++group) {
    std::vector<ServerLanes::Item> items(3);
    for (size_t i = 0; i < 3; ++i) {
      Micro m = random_micro(rng, *reps[i].model, 2, 5);
      if (i == 1 && group == 0) m.y.idata()[2] = 10;
      items[i].part = reps[i].part.get(), items[i].activation = m.x, items[i].labels = m.y, items[i].batch_size = m.batch;
    }
    pool.train(items);
    for (size_t i = 0; i < 3; ++i) {
      if (i == 1 && group == 0) {
        ASSERT_TRUE(items[i].error);
        EXPECT_THROW(std::rethrow_exception(items[i].error), Error);
      } else {
        EXPECT_FALSE(items[i].error);
        EXPECT_EQ(items[i].result.stats.count, 5);
      }
    }
  }
}

TEST(ServerLanes, SplitsTheCoresAmongTheReplicas) {
  EXPECT_EQ(ServerLanes::split_cores(4, 16), (std::pair<int, int>{4, 4}));
  EXPECT_EQ(ServerLanes::split_cores(64, 16), (std::pair<int, int>{16, 1}));
  EXPECT_EQ(ServerLanes::split_cores(3, 16), (std::pair<int, int>{3, 5}));
  EXPECT_EQ(ServerLanes::split_cores(1, 2), (std::pair<int, int>{1, 2}));
  EXPECT_EQ(ServerLanes::split_cores(4, 1), (std::pair<int, int>{1, 1}));
  EXPECT_THROW(ServerLanes(0, 1), Error);
}

TEST(ServerLanes, ThreadLocalCountOverridesTheProcessWideOne) {
  const int before = kernels::num_threads();
  {
    kernels::ScopedThreads t(3);
    EXPECT_EQ(kernels::num_threads(), 3);
    {
      kernels::ScopedThreads u(1);
      EXPECT_EQ(kernels::num_threads(), 1);
    }
    EXPECT_EQ(kernels::num_threads(), 3);
  }
  EXPECT_EQ(kernels::num_threads(), before);
}

}  // namespace
}  // namespace pipar
