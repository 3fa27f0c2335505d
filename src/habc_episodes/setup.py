from setuptools import find_packages, setup

package_name = 'habc_episodes'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='habc developers',
    maintainer_email='habc@example.org',
    description='habc episodes: vocabulary, data model, index, bags and export (no rclpy).',
    license='Apache-2.0',
)
