"""alti"""
