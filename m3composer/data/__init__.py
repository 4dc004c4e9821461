"""m3composer.data"""
