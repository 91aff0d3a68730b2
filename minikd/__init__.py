"""minikd: knowledge distillation and uncertainty distillation for segmentation and depth."""
