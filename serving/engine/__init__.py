"""Engines: what turns a request's prompt into its steps. `protocol` is what a replica needs of
any engine; `hf` is the Hugging Face engine (lossless speculative decoding over any causal LM,
with its KV slots, proposers, sampling, trees and memory plan beside it); `vllm` serves through
vLLM."""
