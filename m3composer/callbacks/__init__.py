"""m3composer.callbacks"""
