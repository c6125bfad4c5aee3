"""Test doubles that speak real protocols: a Cloud TPU API server, a pod of sshd hosts."""
