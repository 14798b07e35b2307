"""Object detection: detector builders, box sampling, teacher training and student distillation."""
