"""Lossless multi-token decoding shared by the text, speech and song tabs.

One verifier, many drafters (reference: /work/shared/reference/text-decoding.md).

Public API
----------
``plain.plain_decode(model, input_ids, max_new_tokens, config, eos_ids, cancel=None, stats=None, forward=None,
processors=None)``
    The baseline: one token per forward, run by the verifier's own loop with ``verify.NoDraft`` (through
    ``verify.StockForward``, the model's own cache, when no ``forward`` is given). Yields ``[token]`` lists.
    ``SamplingConfig`` holds temperature, top-k, top-p and the seed (``generate``'s order and draws); ``processors``
    (e.g. repetition penalty) as in ``generate``.
``verify.speculative_decode(model, input_ids, max_new_tokens, config, eos_ids, drafter, cancel=None,
stats=None, forward=None, *, prefill=None, processors=None, generator=None)``
    Same contract, but each step drafts a ``TokenTree``, verifies it in one forward (float additive 4D
    ancestor mask, ``position_ids = P + depth``) and yields the accepted run (accepted drafts + the bonus
    token). Greedy output is identical to ``plain_decode`` wherever a row's logits do not depend on the rest of
    the block: in fp32 on the CPU (every test) and in any dtype through ``exact.ExactForward``; in bf16 a tree
    forward moves logits in their last bits and near-ties can flip (``divergence.first_divergence`` names the
    token and both logits, from ``DecodeStats(top_logits=[])``). With ``temperature > 0`` the verifier samples at
    each node from the same processed logits and follows the matching child (lossless; with the same seed it
    even draws the same tokens). Stops at EOS inside a run, never exceeds ``max_new_tokens``, checks
    ``cancel`` every step and fills ``DecodeStats`` (forwards, tokens, τ, drafting time). ``prefill`` (model
    inputs such as ``inputs_embeds``) and ``processors`` (a ``LogitsProcessorList`` applied per verified
    position) serve stages like Bark's; ``verify.NoDraft()`` runs the same loop one token per forward. Greedy
    steps without processors read every row's argmax at once (``device_accept.greedy_accept``: one read per
    step) and walk the accepted path on the host; sampled ones walk the tree on the host, drawing exactly where
    plain decoding draws.
``verify.CausalLMForward(model, tree_attention=True, embed=None)``
    How the core calls a model. Any causal LM whose forward takes ``input_ids`` (or ``inputs_embeds``: pass
    ``embed``), ``attention_mask`` (4D float), ``position_ids`` and a transformers cache and returns
    ``.logits`` works; subclass ``__call__`` for models with another head. ``tree_attention=False`` is the
    chain-only mode for attention code that cannot take a 4D mask: trees are cut to their first chain and
    verified under the model's own causal mask. Cache rollback uses only ``cache.crop(-k)`` plus re-feeding.
    Sliding-window models (Gemma 3) keep full-length K/V and get one mask per layer type, the window applied at
    logical positions (``sliding.AttentionLayout``); layers a crop cannot roll back raise
    ``sliding.UnsupportedAttention``.
    With ``record_hidden`` set, ``hidden`` holds the final hidden states (the LM head's input) of the rows
    returned, for drafters that read the model's features.
``static.StaticForward(model, max_cache_len=4096, buckets=BUCKETS, capture=None, compile="off")``
    The GPU fast path with the same interface (pass it as ``forward=`` to ``plain_decode`` or
    ``speculative_decode``): one static K/V cache, blocks padded to fixed query sizes (dummy rows attend only
    to themselves), rollback by moving the write position back, one CUDA graph per bucket. ``capture=None``
    captures on a dedicated CUDA GPU and runs the same static code eagerly on CPU, under ZeroGPU
    (``SPACES_ZERO_GPU``) or after a failed capture. One adapter per concurrent request. A step attends over
    the narrowest key width (powers of two from the largest bucket up) holding its rows, one graph per (bucket,
    width); every one is compiled (``compile="layers"``: the layers' norms and MLPs) and captured on
    the first step (``warm``); ``fit(tree, before_root)`` cuts a tree whose re-fed rows would spill it into the
    next bucket. ``captured.CapturedCalls`` replays drafters' fixed-shape device work (the ReDrafter head's
    levels, Token Recycling's template fill) as CUDA graphs the same way.
``exact.ExactForward(model, max_cache_len=4096, rows=EXACT_ROWS, block=EXACT_BLOCK, capture=None, embed=None)``
    Exact mode with the same interface: every forward is ``rows`` rows (padded, or several forwards) fed as
    length-1 sequences over a static cache, each row's attention reading the K/V gathered in its own path's
    order, so a row's logits and K/V are a function of its path only and drafted greedy output is bit-identical
    to plain decoding through the same adapter. One CUDA graph where ``static.StaticForward`` would capture.
``verify.Drafter``
    ``propose(context) -> TokenTree`` (root = ``context[-1]``), ``update(tree, logits, accepted)``, and
    optional ``start(prompt)`` / ``finish()``; ``embedding(model)`` for trees with virtual tokens (PPD);
    ``reads_hidden`` + ``read_hidden(hidden)`` for drafters fed the model's features (ReDrafter);
    ``trained_used()`` for the result stats of drafters with trained weights.
``tree.TokenTree(tokens, parents)``
    ``TokenTree.chain(root, draft)`` for chain drafters; ``truncated``, ``first_chain``, ``children``.

Drafters, one module each in ``drafters/``: ``recycling.TokenRecycling`` (the [vocab, 8] matrix),
``lookahead.LookaheadTrie`` (over an ``NGramTrie``), ``prompt_lookup.PromptLookup``,
``draft_model.DraftModel(small_model)``, ``prompt_tokens.ParallelPromptDecoding(prompts, costs)`` (trained prompt
tokens, ``training.prompt_training``), ``recurrent_drafter.RecurrentDrafting(head, model, costs)`` (a trained draft
head on the model's last hidden state, ``training.recurrent_training``), and ``merged.MergedDrafter`` joining them
in one tree. What they share across requests
for one model (recycling matrix, output trie, merged counts, cost curves, trained weights) is
``state.DecodingState(model)``, kept with the loaded model. Trained weights are found per model id by
``trained.TrainedWeights`` and loaded once into it (``DecodingState.load_trained``; ``use`` overrides). Tree size
per device: ``DecodingState.step_costs(profile, forward)`` (measured through the serving ``forward`` at its buckets
when it has some: ``hardware.bucketed``) and one rule, ``hardware.pick_tree_size(path, costs, prices, host_s)``: the
prefix with the most expected accepted tokens per second of ``hardware.step_cost`` (the curve at tree nodes + re-fed
rows) plus, for a tree beyond the bare root, the drafter's measured host seconds per drafted step
(``hardware.DraftingCost``: the served merged drafter and ReDrafter, which fall back to plain one-token steps while no
tree pays for its drafting); every drafter that sizes a tree (recycling, merged, ReDrafter, PPD) supplies only its
nodes' path probabilities.

The text tab's side: ``methods.DECODING_METHODS`` (each method's label and drafter; a new method is its drafter's
module plus one entry there), ``serving.fast_forward`` / ``serving.exact_forward`` (which adapter serves a request,
kept with the model), ``reply.Reply`` (the streamed reply: stop strings, EOS, per-run texts) and
``compare.compare_stats`` (the A/B report, with ``divergence``).
"""
