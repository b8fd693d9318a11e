"""Generated from proto/via_sd.proto by `python -m via_sd_ray.serving.protogen`."""
