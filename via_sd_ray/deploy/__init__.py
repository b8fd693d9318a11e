"""Deploying via-sd-ray beyond one machine: Kubernetes manifests rendered from the Serve config."""
