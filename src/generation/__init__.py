"""One way to generate text, whatever runs the model.

Every caller (step 4 and the trainer's dev evaluation, the terminal and web chats, the judge's answers, the QA
rewriting) describes what it wants the same way and hands it to a backend:

* ``Prompt`` (types.py): the prompt's token ids (and, for a server, its text or chat messages), plus a ``group`` hint
  for prompts likely to share a prefix;
* ``GenerationConfig`` (types.py): max/min new tokens, the stop token ids (``stops.stop_token_ids``: the one stop
  rule), whether generation may end once the first non-empty line is complete (step 4: the extractor reads only that
  line), and ``Sampling`` (greedy, or temperature/top-p/top-k, repetition penalty, seed);
* ``Generation`` (types.py): the new token ids, their text, why generation ended ("eos", "line", "max_tokens").

A backend (backends.py) has two calls: ``generate(prompts, config, on_result=...)`` for a batch (each result handed to
``on_result`` as soon as it is ready) and ``stream(prompt, config)`` for one reply growing piece by piece. The
backends:

* ``custom`` (engine.py): our batched engine, greedy only: continuous batching, shared prefixes computed once, rows
  stopped at the end of their first line; the CPU default of step 4;
* ``hf`` (hf.py): transformers' ``generate``, greedy batches or seeded sampling one prompt at a time; no transformers
  internals (the fallback after a library upgrade);
* ``cb`` (cb.py): transformers' own continuous batching (``generate_batch``: paged attention, CUDA graphs);
* ``openai`` (server.py): any OpenAI-compatible server (vLLM, ``transformers serve``, a hosted API).

The in-process backends stream through one token loop (stream.py) that works with anything called like a causal LM,
proxy-tuning's wrapper included.
"""
