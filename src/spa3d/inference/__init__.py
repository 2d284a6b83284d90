"""Inference: likelihoods over poses (the E-step kernel) and, in time, the EM and SGD loops."""
