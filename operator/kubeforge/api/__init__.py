"""Typed models of the kubeforge.dev/v1alpha1 kinds: the single source of the CRD schemas."""
