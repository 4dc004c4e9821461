"""m3composer.algorithms"""
