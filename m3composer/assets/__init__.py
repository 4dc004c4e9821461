"""What the offline quickstart needs: a real small model, a tiny test model, real sample data."""
