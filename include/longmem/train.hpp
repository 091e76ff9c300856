#pragma once
// Training in C++ (no Python in the loop): backward passes, AdamW, document streams,
// resumable checkpoints, and the two tasks.
//
//   SideNetAdaptation<Bank, Retriever, Fusion, T>   memory-augmented adaptation (the paper's
//                                                   mode): frozen backbone, the SideNet trains
//   BackbonePretraining<T, L>                       a GPT-2 / GPT-2* backbone from scratch (L = Host,
//                                                   or Device with <longmem/cuda/ops.cuh>)
//   Trainer<Task>                                   accumulation, clipping, schedule, AdamW,
//                                                   validation, checkpoints
#include "longmem/longmem.hpp"
#include "longmem/train/adaptation.hpp"
#include "longmem/train/data.hpp"
#include "longmem/train/gpt2_backward.hpp"
#include "longmem/train/optimizer.hpp"
#include "longmem/train/pretraining.hpp"
#include "longmem/train/side_net_backward.hpp"
#include "longmem/train/synthetic.hpp"
#include "longmem/train/trainer.hpp"
