"""The VIA-SD algorithm: pure torch, no Ray, no tokenizer, no HTTP.

Vocabulary (used everywhere in via-sd-ray):

- **block**: the K draft tokens the drafter proposes in one step.
- **tier**: who decides on a block: ``direct`` (accepted on the drafter's word),
  ``slim`` (the slim verifier, a routed subset of the full verifier's layers) or
  ``full`` (the full verifier).
- **confidence**: a score in [0, 1]. A block's confidence comes from the drafter's
  probabilities of its tokens; a verifier's confidence at a position is its own top
  probability there.
- **accepted**: draft tokens a verifier agreed with (a prefix of the block).
- **recovered**: the token a verifier puts in place of the first rejected draft token.
- **bonus**: the extra token a verifier emits after a fully accepted block.
- **commit**: appending tokens to the generation; committed tokens are final and streamed.
- **catch-up**: a tier whose KV cache lags the committed tokens (it skipped directly
  accepted blocks, or was rolled back) processes the missing tokens in the same forward
  pass as its next block, never by re-prefilling the sequence.
- **fidelity**: the fraction of committed tokens equal to what the full verifier would
  have emitted given the same prefix (greedy, teacher-forced).

The engine knows nothing about tokenization: it sees token ids, and stop strings are
checked through a ``decode`` callable handed to it.
"""
