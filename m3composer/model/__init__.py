"""m3composer.model"""
