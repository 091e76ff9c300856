#pragma once
// The umbrella header: everything a host application needs on the CPU.
// CUDA specialisations live under <longmem/cuda/...> (compile those TUs with nvcc);
// the float64 reference implementations used by tests under <longmem/reference/...>.
#include "longmem/config.hpp"
#include "longmem/error.hpp"
#include "longmem/dtype.hpp"
#include "longmem/tensor.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/cpu/ops.hpp"
#include "longmem/backbone.hpp"
#include "longmem/gpt2_backbone.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/cpu/host_memory_bank.hpp"
#include "longmem/chunk_retriever.hpp"
#include "longmem/cpu/exact_chunk_retriever.hpp"
#include "longmem/fusion.hpp"
#include "longmem/side_net.hpp"
#include "longmem/model.hpp"
#include "longmem/perplexity.hpp"
#include "longmem/tokenizer.hpp"
