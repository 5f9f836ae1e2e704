"""Analyses of learned representations: invariance to the jigsaw transform, kNN."""
