"""skysense.encoders"""
