"""Models. Dimension letters used in shape comments across the package:

B batch, T tokens, S cached context columns, D drafter width, Dt target width, H query heads,
Hk key/value heads, hd head dim, K draft length (gamma), V vocabulary, Ls drafter layers.
"""
