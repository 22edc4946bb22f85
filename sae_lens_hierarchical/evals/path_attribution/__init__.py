"""Path attribution eval: each root-to-latent path node's share of the reconstruction, a probe direction and the logits."""
