"""Hierarchy eval: hierarchical consistency (necessity, coverage, HCS, Hamming, KL) of an SAE's tree."""
